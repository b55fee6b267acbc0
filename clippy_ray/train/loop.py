"""The per-worker training loop: build, restore, loop (batch, step, log, validate, checkpoint),
finish. Runs inside each Ray Train worker; DeepSpeed wraps the plain model."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from clippy_ray import config, precision
from clippy_ray.console import emitter
from clippy_ray.data.pipeline import BatchStream
from clippy_ray.data.plan import epoch_of
from clippy_ray.data.transforms import normalize
from clippy_ray.loss import ContrastiveLoss, blockwise_loss, gather_with_grad
from clippy_ray.model import build_model
from clippy_ray.model.handoff import HANDOFF_DIR, export_handoff, load_weights
from clippy_ray.tokenizer import build_tokenizer
from clippy_ray.train import optim
from clippy_ray.train.checkpoint import DEEPSPEED_TAG, full_state_dict, load_shards
from clippy_ray.train.engine import build_engine
from clippy_ray.train.progress import Progress
from clippy_ray.train.trainer import checkpoint_uri


@dataclass
class TrainState:
    """What a checkpoint records besides the weights. `data_position`: the rows the training stream
    had handed to all workers when it was taken (`clippy_ray.data.plan`); the next attempt's stream
    starts there. Rows still in the workers' shuffle buffers then are not trained on; rows the
    stream had read ahead of them are not counted, so they are read again."""

    step: int = 0  # optimizer steps done
    data_position: int = 0
    epoch: int = 0  # the epoch data_position falls in (for people: each epoch reads every row once)


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


def _first(stream: BatchStream) -> float:
    return float("inf") if stream.first_position is None else float(stream.first_position)


def _min_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.item()


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
        for _ in range(cfg.train.val_batches):
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
    engine, model, state: TrainState, cfg: config.Config, tokenizer, metrics: dict, layout: str
) -> None:
    """DeepSpeed shards from every rank + the handoff export from rank 0, reported as one
    checkpoint. Ray registers it only once every rank's part is stored: complete or absent."""
    import ray.train

    rank = dist.get_rank()
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DEEPSPEED_TAG, client_state={"train_state": asdict(state)})
        weights = full_state_dict(engine)  # collective under ZeRO-3
        if rank == 0:
            export_handoff(model, weights, cfg, tokenizer, os.path.join(tmp, HANDOFF_DIR))
            with open(os.path.join(tmp, "train_state.json"), "w") as f:
                json.dump({**asdict(state), **metrics, "precision": cfg.train.precision, "param_layout": layout}, f)
        ray.train.report(
            {**metrics, **asdict(state)},  # data_position: what trainer.resume_point reads back
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"step_{state.step:08d}",
        )


def restore(engine, checkpoint_dir: str, source: str) -> TrainState:
    """Resume the full state (weights, optimizer, schedule, data position) from a checkpoint folder's
    DeepSpeed shards, read without running pickled code; `source` (its URI) names a bad shard."""
    client = load_shards(engine, checkpoint_dir, source)
    saved = (client or {}).get("train_state") or {}
    return TrainState(**{k: v for k, v in saved.items() if k in TrainState.__dataclass_fields__})


def saved_train_state(uri: str) -> dict | None:
    """A checkpoint's train_state.json (None where it cannot be read)."""
    from clippy_ray import storage

    try:
        return json.loads(storage.read_bytes(storage.join(uri, "train_state.json")))
    except (OSError, ValueError, storage.StorageError):
        return None


def saved_precision(train_state: dict | None) -> str | None:
    """The precision (bf16 / fp32) a checkpoint was trained in, from its train_state.json; None for
    a checkpoint that does not record it."""
    saved = (train_state or {}).get("precision")
    return saved if saved in ("bf16", "fp32") else None


def train_loop(loop_config: dict) -> None:
    import ray.train

    from clippy_ray import storage

    cfg = config.from_dict(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if cfg.train.use_gpu else torch.device("cpu")

    # Build (precision first: the DeepSpeed config and the handoff's config record the resolved one).
    # A restarted attempt keeps the precision its checkpoint was trained in: `auto` decided again
    # (a matmul race, on a loaded machine) can pick the other one, whose shards do not load.
    checkpoint, init_from = ray.train.get_checkpoint(), loop_config.get("init_from")
    from_weights = checkpoint is None and init_from and loop_config.get("init_mode", "weights") == "weights"
    # the checkpoint whose full state this attempt resumes: this run's latest, else --from in full mode
    resumed = None
    if checkpoint is not None:
        resumed = checkpoint_uri(cfg, checkpoint)
    elif init_from and not from_weights:
        resumed = init_from
    saved = saved_train_state(resumed) if resumed else None
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
    # a resumed optimizer state loads only into the parameter order it was saved in
    order = optim.resume_order(model, saved, resumed) if resumed else optim.aligned_order
    layout = optim.layout(model, order)
    engine = build_engine(model, cfg.train, order)
    dtype = choice.dtype
    loss_fn = ContrastiveLoss(loss_dtype, cfg.loss.chunk_size)

    # Restore: this run's latest checkpoint, else the full state of the one given with --from
    state = TrainState()
    if checkpoint is not None:
        source = checkpoint_uri(cfg, checkpoint)
        # A folder of this process's own: Ray's as_directory() shares one temporary folder per
        # checkpoint between the processes of a machine and deletes it when one of them is done,
        # which can pull the shards from under a rank still reading them (seen on a node loss).
        with tempfile.TemporaryDirectory(prefix="clippy-ray-restore-") as folder:
            checkpoint.to_directory(folder)
            state = restore(engine, folder, source)
    elif init_from and not from_weights:
        state = restore(engine, str(storage.fetch(init_from)), init_from)
    if state.step >= cfg.train.steps:
        return

    # Loop: one pass over a stream that starts at the restored data position (the dataset factory,
    # trainer.TrainStream, built it from the same checkpoint) and covers every remaining step
    stream = BatchStream(
        ray.train.get_dataset_shard("train"),
        cfg.train.micro_batch_size,
        cfg.data.shuffle_buffer,
        seed=cfg.data.seed * 1_000_003 + rank,
    )
    val_shard = ray.train.get_dataset_shard("val") if loop_config.get("has_val") else None
    rows_per_epoch = loop_config.get("rows_per_epoch") or 0
    progress = Progress(cfg, enabled=rank == 0, emit=emitter(loop_config.get("events")), start_step=state.step)
    epoch = epoch_of(state.data_position, rows_per_epoch)
    progress.start("GPU" if device.type == "cuda" else "CPU", choice.reason, state.data_position, epoch)
    accum, micro = cfg.train.grad_accum_steps, 0
    window = {"loss": 0.0, "n": 0}
    start = state.data_position
    batches = iter(stream.epoch(start))
    while state.step < cfg.train.steps:
        wait_start = time.perf_counter()
        ok, batch = _next_batch(batches, device)
        if not ok:
            counts = _mean_over_ranks(stream.counters(), device, total=("rows_seen", "rows_skipped", "rows_dropped"))
            raise RuntimeError(
                f"data.train={cfg.data.train}: the stream ended at step {state.step} of {cfg.train.steps} after "
                f"{counts['rows_seen']:.0f} rows ({counts['rows_skipped']:.0f} bad rows skipped); check the data "
                "with `clippy-ray data inspect`"
            )
        progress.data_wait(time.perf_counter() - wait_start)
        img, txt, scale = engine(*_inputs(batch, device, dtype))
        loss = loss_fn(img, txt, scale)
        engine.backward(loss)
        engine.step()
        window["loss"] += loss.detach()  # read at log steps only: .item() waits for the GPU
        window["n"] += 1
        micro += 1
        if micro % accum:
            continue
        state.step += 1
        progress.step_done(len(batch["image"]) * accum * dist.get_world_size())
        metrics = {}
        last = state.step == cfg.train.steps
        checkpoint = state.step % cfg.train.checkpoint_every == 0 or last
        if state.step % cfg.train.log_every == 0 or last or checkpoint:
            counts = _mean_over_ranks(
                {"loss": float(window["loss"]) / max(window["n"], 1), **stream.counters()},
                device,
                total=("rows_seen", "rows_skipped", "rows_dropped"),
            )
            state.data_position = start + int(counts.pop("rows_seen"))
            state.epoch = epoch_of(state.data_position, rows_per_epoch)
            data_start = _min_over_ranks(_first(stream), device)
            if state.step % cfg.train.log_every == 0 or last:
                metrics = {**counts, "rows_seen": state.data_position - start, "data_start": data_start}
                metrics.update(temperature=1.0 / scale.float().item(), lr=engine.get_lr()[0], **progress.rates())
                window = {"loss": 0.0, "n": 0}
        if val_shard is not None and (last or (cfg.train.val_every and state.step % cfg.train.val_every == 0)):
            metrics.update(validate(engine, val_shard, cfg, dtype))
        if metrics:
            progress.log(state.step, metrics)
        if checkpoint:
            save_checkpoint(engine, model, state, cfg, tokenizer, metrics, layout)
            progress.checkpoint(state.step)
        elif metrics:
            ray.train.report({**metrics, **asdict(state)})
    progress.finish()
