"""The per-worker training loop: build, restore, loop (batch, step, log, validate, checkpoint),
finish. Runs inside each Ray Train worker; DeepSpeed wraps the plain model."""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from clippy_ray import config, precision, storage
from clippy_ray.console import emitter
from clippy_ray.data.pipeline import BatchStream
from clippy_ray.data.plan import RepeatedRows
from clippy_ray.data.transforms import normalize
from clippy_ray.loss import ContrastiveLoss, blockwise_loss, gather_with_grad
from clippy_ray.model import build_model
from clippy_ray.model.handoff import HANDOFF_DIR, export_handoff, load_weights
from clippy_ray.tokenizer import build_tokenizer
from clippy_ray.train import optim, shards
from clippy_ray.train.checkpoint import download_legacy, full_state_dict, load_shards
from clippy_ray.train.engine import build_engine, cached_engine_step, master_logit_scale
from clippy_ray.train.progress import Progress
from clippy_ray.train.state import (
    BATCHES_FILE,
    STATE_FILE,
    TrainState,
    checkpoint_uri,
    require_train_state,
    saved_precision,
)

# Steps between looks for a drain notice (one collective through Ray each): a spot notice comes 2
# minutes ahead, which this leaves for the checkpoint unless a step takes over 10 s.
DRAIN_CHECK_EVERY = 5


def _all_true(flag: bool, device: torch.device) -> bool:
    """True on every rank iff true on every rank. Ranks can hold different numbers of batches (bad
    rows are dropped per shard); all stop together so no collective waits forever."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _mean_over_ranks(values: dict[str, float], device: torch.device, total: tuple[str, ...] = ()) -> dict[str, float]:
    names = sorted(values)
    t = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    world = dist.get_world_size()
    return {k: (v if k in total else v / world) for k, v in zip(names, t.tolist())}


def _next_batch(iterator, device):
    batch = next(iterator, None)
    return _all_true(batch is not None, device), batch


def agree_precision(requested: str, device: torch.device, zero_stage: int = 1) -> precision.Choice:
    """train.precision resolved on every rank, the same everywhere (DeepSpeed needs one dtype):
    bf16 only if every worker's device runs it natively, and ZeRO keeps the gradients in fp32."""
    if requested == "auto" and zero_stage == 0:
        return precision.Choice("fp32", "train.zero_stage=0: DeepSpeed would keep bf16 gradients in bf16")
    choice = precision.choose(requested, device)
    if requested != "auto":
        return choice
    if _all_true(choice.precision == "bf16", device):
        return choice
    if choice.precision == "bf16":
        return precision.Choice("fp32", "not every worker's device runs bf16 natively")
    return choice


def _inputs(batch: dict, device: torch.device, dtype: torch.dtype):
    return (
        normalize(batch["image"].to(device, non_blocking=True), dtype),
        batch["input_ids"].to(device, non_blocking=True),
        batch["attention_mask"].to(device, non_blocking=True),
    )


def validate(engine, shard, cfg: config.Config, dtype: torch.dtype) -> dict[str, float]:
    """On the fixed validation subset (the same rows every time, `trainer.val_rows`): the
    contrastive loss over the whole subset at once and zero-shot retrieval (image->text,
    text->image top-1), both independent of how the rows were split between the workers."""
    engine.eval()
    stream = BatchStream(shard, cfg.train.micro_batch_size)
    it = iter(stream.epoch(0))
    images, texts = [], []
    with torch.no_grad():
        while True:  # the whole shard: the subset is the same on any number of workers
            ok, batch = _next_batch(it, engine.device)
            if not ok:
                break
            img, txt, scale = engine(*_inputs(batch, engine.device, dtype))
            images.append(gather_with_grad(img.float()))
            texts.append(gather_with_grad(txt.float()))
    engine.train()
    if not images:
        return {}
    img, txt = torch.cat(images), torch.cat(texts)
    val_loss = blockwise_loss(img, txt, img, txt, scale.float(), 0, torch.float32)
    sim = img @ txt.T
    target = torch.arange(len(img), device=sim.device)
    return {
        "val_loss": val_loss.item(),
        "val_i2t_top1": (sim.argmax(1) == target).float().mean().item(),
        "val_t2i_top1": (sim.argmax(0) == target).float().mean().item(),
        "val_pairs": float(len(img)),
    }


def save_checkpoint(
    engine, model, state: TrainState, cfg: config.Config, tokenizer, metrics: dict, record: dict, batches=None
) -> None:
    """Every rank's optimizer pieces (`shards`) + the handoff export and train_state.json from rank
    0 (and `batches`, the rows each step trained on, with train.record_batches), reported as one
    checkpoint. Ray registers it only once every rank's part is stored: complete or absent."""
    import ray.train

    rank = dist.get_rank()
    with tempfile.TemporaryDirectory(prefix="clippy-ray-checkpoint-") as tmp:
        shards.save(engine, tmp)
        weights = full_state_dict(engine)  # collective under ZeRO-3
        scale = master_logit_scale(engine)  # collective: the float32 master, not the module's bf16 copy
        if rank == 0:
            weights["logit_scale"] = scale.reshape(weights["logit_scale"].shape)
            export_handoff(model, weights, cfg, tokenizer, os.path.join(tmp, HANDOFF_DIR))
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump({**record, **metrics, **state.to_dict(record["rows_per_epoch"])}, f)
            if batches is not None:
                os.makedirs(os.path.join(tmp, "data"))
                np.save(os.path.join(tmp, BATCHES_FILE), batches, allow_pickle=False)
        ray.train.report(
            {**metrics, "step": state.step, "data_position": state.data_position},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"step_{state.step:08d}",
            validation=bool(cfg.eval.during_training.data),  # evaluated as it lands (trainer.validation_config)
        )


def restore(engine, uri: str, saved: dict) -> int:
    """Weights, optimizer state, schedule and counters from the checkpoint at `uri` (its
    train_state.json: `saved`), on any number of workers; returns the bytes this rank read. Each
    rank reads only the pieces its partition needs; an older checkpoint's DeepSpeed shards (`ds/`)
    are read whole, without running pickled code."""
    if storage.exists(storage.join(uri, shards.INDEX)):
        return shards.load(engine, uri)
    with tempfile.TemporaryDirectory(prefix="clippy-ray-restore-") as folder:
        read = download_legacy(uri, folder)
        load_shards(engine, folder, uri)
    return read


def _gather(mine: np.ndarray) -> np.ndarray | None:
    """Every rank's array concatenated, on rank 0 (None elsewhere)."""
    every = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, every, dst=0)
    return np.concatenate(every) if every is not None else None


def _gather_lines(mine: list[str]) -> list[str]:
    """Every rank's lines, on rank 0 (none elsewhere), each once."""
    every = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, every, dst=0)
    return list(dict.fromkeys(line for lines in every or [] for line in lines))


def _resume_lines(state: TrainState, saved: dict, t: config.TrainConfig, bytes_read: int, rows_per_epoch: int, device):
    """(what the attempt restored, how it was resized) for the console, `t` resolved for this
    attempt's workers; collective (the bytes read per rank)."""
    read = torch.tensor([bytes_read, bytes_read], dtype=torch.float64, device=device)
    top, total = read.clone(), read.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    dist.all_reduce(total)
    beyond = state.rows.count - state.data_position
    resumed = (
        f"resuming at step {state.step} from data position {state.data_position} (epoch "
        f"{state.epoch(rows_per_epoch)}){f', {beyond} rows beyond it trained' if beyond else ''}; checkpoint "
        f"read: {top[0].item() / 2**20:.1f} MiB on the busiest rank, {total[0].item() / 2**20:.1f} MiB in all"
    )
    before = saved.get("world_size")
    resized = ""
    if before and before != t.num_workers:
        resized = (
            f"resized from {before} to {t.num_workers} workers: gradient accumulation "
            f"{saved.get('grad_accum_steps', '?')} -> {t.grad_accum_steps} keeps {t.global_batch_size} pairs per step"
        )
    return resumed, resized


def _stream_ended(stream: BatchStream, cfg: config.Config, step: int, device) -> RuntimeError:
    """The error of a stream that ran out before train.steps, with the rows it read and skipped
    (collective: every rank's counts)."""
    counts = _mean_over_ranks(stream.counters(), device, total=tuple(stream.counters()))
    why = ", ".join(f"{counts[k]:.0f} {k[8:].replace('_', ' ')}" for k in counts if k.startswith("skipped_"))
    return RuntimeError(
        f"data.train={cfg.data.train}: the stream ended at step {step} of {cfg.train.steps} after "
        f"{counts['rows_seen']:.0f} rows ({counts['rows_skipped']:.0f} bad rows skipped: {why}); check the data "
        "with `clippy-ray data inspect`"
    )


def _check_untrained(state: TrainState, batch: dict, source: str | None) -> None:
    """Stop, with the reason, if the stream hands out a row the restored state has trained on: it
    was built for another state than the one the workers restored."""
    positions = batch["position"].numpy()
    seen = state.rows.contains(positions)
    if seen.any():
        raise RuntimeError(
            f"{RepeatedRows(positions[seen])}; the training stream does not start where the restored checkpoint "
            f"({source or 'none: a new run'}) says the run is. Nothing was trained on them again; report this "
            "with the run's logs"
        )


def train_loop(loop_config: dict) -> None:
    import ray.train

    cfg = config.from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # On fewer workers than max (elastic), the accumulation takes up the difference: the same
    # micro-batch per worker and the same global batch.
    cfg.train.grad_accum_steps, cfg.train.num_workers = cfg.train.grad_accum_at(world), world
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if cfg.train.use_gpu else torch.device("cpu")

    # Build (precision first: the DeepSpeed config and the handoff's config record the resolved one).
    # A restarted attempt keeps the precision its checkpoint was trained in: `auto` decided again
    # (a matmul race, on a loaded machine) can pick the other one.
    checkpoint, init_from = ray.train.get_checkpoint(), loop_config.get("init_from")
    from_weights = checkpoint is None and init_from and loop_config.get("init_mode", "weights") == "weights"
    # the checkpoint whose full state this attempt resumes: this run's latest (the one the dataset
    # factory built the stream for), else --from in full mode
    resumed = None
    if checkpoint is not None:
        resumed = checkpoint_uri(cfg, checkpoint)
    elif init_from and not from_weights:
        resumed = init_from
    saved = require_train_state(resumed) if resumed else {}
    requested = cfg.train.precision
    if requested == "auto" and checkpoint is not None:
        requested = saved_precision(saved) or requested
    choice = agree_precision(requested, device, cfg.train.zero_stage)
    cfg.train.precision = choice.precision
    loss_dtype = precision.matmul_dtype(cfg.loss.matmul_dtype, choice.precision)
    cfg.loss.matmul_dtype = str(loss_dtype).removeprefix("torch.")
    tokenizer = build_tokenizer(cfg.model.text)
    model = build_model(cfg.model, tokenizer.vocab_size)
    if from_weights:  # the handoff's safetensors, before DeepSpeed copies the weights; no shard is read
        load_weights(model, init_from)
    # an older checkpoint's optimizer state loads only into the parameter order it was saved in
    legacy = resumed and not storage.exists(storage.join(resumed, shards.INDEX))
    order = optim.resume_order(model, saved, resumed) if legacy else optim.aligned_order
    layout = optim.layout(model, order)
    engine = build_engine(model, cfg.train, order)
    dtype = choice.dtype
    loss_fn = ContrastiveLoss(loss_dtype, cfg.loss.chunk_size)
    rows_per_epoch = loop_config.get("rows_per_epoch") or 0
    record = {  # what train_state.json records besides the progress
        "precision": cfg.train.precision,
        "param_layout": layout,
        "optimizer": cfg.train.optimizer,
        "zero_stage": cfg.train.zero_stage,
        "world_size": world,
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "global_batch_size": cfg.train.global_batch_size,
        "rows_per_epoch": rows_per_epoch,
    }

    # Restore: this run's latest checkpoint, else the full state of the one given with --from
    state, bytes_read = TrainState(), 0
    if resumed:
        bytes_read = restore(engine, resumed, saved)
        state = TrainState.from_dict(saved)
    if state.step >= cfg.train.steps:
        return

    # Loop: one pass over a stream that holds exactly the rows the restored state has not trained
    # on (the dataset factory, trainer.TrainStream, built it from the same checkpoint)
    stream = BatchStream(
        ray.train.get_dataset_shard("train"),
        cfg.train.micro_batch_size,
        cfg.data.shuffle_buffer,
        seed=cfg.data.seed * 1_000_003 + rank,
    )
    val_shard = ray.train.get_dataset_shard("val") if loop_config.get("has_val") else None
    progress = Progress(cfg, enabled=rank == 0, emit=emitter(loop_config.get("events")), start_step=state.step)
    resumed_line, resized_line = "", ""
    if resumed:
        resumed_line, resized_line = _resume_lines(state, saved, cfg.train, bytes_read, rows_per_epoch, device)
    progress.start("GPU" if device.type == "cuda" else "CPU", choice.reason, resumed_line, resized_line)
    accum = cfg.train.grad_accum_steps
    cached = accum > 1 and cfg.loss.negatives == "global"  # one loss over the whole global batch

    def forward(batch):
        return engine(*_inputs(batch, device, dtype))

    window = {"loss": 0.0, "n": 0}
    batches = iter(stream.epoch(state.data_position))
    preempted = False
    trained: list[np.ndarray] = []  # train.record_batches: this rank's rows since the last checkpoint
    while state.step < cfg.train.steps:
        group = []  # this step's micro-batches, with the feature cache
        for _ in range(accum):
            wait_start = time.perf_counter()
            ok, batch = _next_batch(batches, device)
            if not ok:
                raise _stream_ended(stream, cfg, state.step, device)
            _check_untrained(state, batch, resumed)
            if cfg.train.record_batches:  # (step, rank, position) of each row, in training order
                positions = batch["position"].numpy()
                trained.append(
                    np.stack([np.full_like(positions, state.step + 1), np.full_like(positions, rank), positions], 1)
                )
            progress.data_wait(time.perf_counter() - wait_start)
            if cached:
                group.append(batch)
                continue
            img, txt, scale = forward(batch)
            loss = loss_fn(img, txt, scale)
            engine.backward(loss)
            engine.step()
            window["loss"] += loss.detach()  # read at log steps only: .item() waits for the GPU
            window["n"] += 1
        if cached:
            loss, scale = cached_engine_step(engine, forward, group, loss_fn, device)
            window["loss"] += loss
            window["n"] += 1
        state.step += 1
        progress.step_done(len(batch["image"]) * accum * world)
        metrics = {}
        last = state.step == cfg.train.steps
        logging = state.step % cfg.train.log_every == 0 or last
        checkpoint, why = state.step % cfg.train.checkpoint_every == 0 or last, ""
        drain_check = logging or state.step % DRAIN_CHECK_EVERY == 0
        if drain_check and not preempted and ray.train.get_preemption_info() is not None:  # collective
            preempted = True  # a spot node's notice: checkpoint now, once, and train on until it goes
            # said even when the notice lands on a scheduled checkpoint's step: the console tells a
            # person that the notice was seen and this is the checkpoint the run will resume from
            checkpoint, why = True, "a node of this run is being drained"
        if logging:
            counts = _mean_over_ranks(
                {"loss": float(window["loss"]) / max(window["n"], 1), **stream.counters()},
                device,
                total=tuple(stream.counters()),
            )
            for problem in _gather_lines(stream.take_problems()):  # an unreadable shard: one line each
                progress.data_problem(state.step, problem)
            metrics = {**counts, "temperature": 1.0 / scale.float().item(), "lr": engine.get_lr()[0]}
            metrics.update(progress.rates())
            window = {"loss": 0.0, "n": 0}
        if val_shard is not None and (last or (cfg.train.val_every and state.step % cfg.train.val_every == 0)):
            metrics.update(validate(engine, val_shard, cfg, dtype))
        audit = None
        if checkpoint:
            consumed = _gather(stream.take_consumed())
            if consumed is not None:
                state.rows.add(consumed)  # RepeatedRows if a row had been trained on already
            if cfg.train.record_batches:
                audit = _gather(np.concatenate(trained) if trained else np.zeros((0, 3), np.int64))
                trained = []
        if metrics:
            progress.log(state.step, metrics)
        if checkpoint:
            save_checkpoint(engine, model, state, cfg, tokenizer, metrics, record, audit)
            progress.checkpoint(state.step, why)
        elif metrics:
            ray.train.report({**metrics, "step": state.step})
    progress.finish()
