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
from clippy_ray.data.transforms import normalize
from clippy_ray.loss import ContrastiveLoss, gather_with_grad
from clippy_ray.model import build_model
from clippy_ray.model.handoff import HANDOFF_DIR, export_handoff, load_weights
from clippy_ray.tokenizer import build_tokenizer
from clippy_ray.train.checkpoint import DEEPSPEED_TAG, full_state_dict, load_shards
from clippy_ray.train.engine import build_engine
from clippy_ray.train.progress import Progress
from clippy_ray.train.trainer import checkpoint_uri


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro batches this worker consumed in `epoch`


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


def validate(engine, shard, cfg: config.Config, dtype: torch.dtype, loss_fn: ContrastiveLoss) -> dict[str, float]:
    """Validation loss and zero-shot retrieval (image->text, text->image top-1 over all val pairs
    gathered from every worker)."""
    engine.eval()
    stream = BatchStream(shard, cfg.train.micro_batch_size)
    it = iter(stream.epoch(0))
    losses, images, texts = [], [], []
    with torch.no_grad():
        for _ in range(cfg.train.val_batches):
            ok, batch = _next_batch(it, engine.device)
            if not ok:
                break
            img, txt, scale = engine(*_inputs(batch, engine.device, dtype))
            losses.append(loss_fn(img, txt, scale).item())
            images.append(gather_with_grad(img.float()))
            texts.append(gather_with_grad(txt.float()))
    engine.train()
    if not losses:
        return {}
    img, txt = torch.cat(images), torch.cat(texts)
    sim = img @ txt.T
    target = torch.arange(len(img), device=sim.device)
    val_loss = _mean_over_ranks({"val_loss": sum(losses) / len(losses)}, engine.device)["val_loss"]
    return {
        "val_loss": val_loss,
        "val_i2t_top1": (sim.argmax(1) == target).float().mean().item(),
        "val_t2i_top1": (sim.argmax(0) == target).float().mean().item(),
        "val_pairs": float(len(img)),
    }


def save_checkpoint(engine, model, state: TrainState, cfg: config.Config, tokenizer, metrics: dict) -> None:
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
                json.dump({**asdict(state), **metrics}, f)
        ray.train.report(
            {**metrics, "step": state.step, "epoch": state.epoch},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"step_{state.step:08d}",
        )


def restore(engine, checkpoint_dir: str, source: str) -> TrainState:
    """Resume the full state (weights, optimizer, schedule, data position) from a checkpoint folder's
    DeepSpeed shards, read without running pickled code; `source` (its URI) names a bad shard."""
    client = load_shards(engine, checkpoint_dir, source)
    return TrainState(**client["train_state"]) if client else TrainState()


def train_loop(loop_config: dict) -> None:
    import ray.train

    from clippy_ray import storage

    cfg = config.from_dict(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if cfg.train.use_gpu else torch.device("cpu")

    # Build (precision first: the DeepSpeed config and the handoff's config record the resolved one)
    choice = agree_precision(cfg.train.precision, device, cfg.train.zero_stage)
    cfg.train.precision = choice.precision
    loss_dtype = precision.matmul_dtype(cfg.loss.matmul_dtype, choice.precision)
    cfg.loss.matmul_dtype = str(loss_dtype).removeprefix("torch.")
    tokenizer = build_tokenizer(cfg.model.text)
    model = build_model(cfg.model, tokenizer.vocab_size)
    checkpoint, init_from = ray.train.get_checkpoint(), loop_config.get("init_from")
    from_weights = checkpoint is None and init_from and loop_config.get("init_mode", "weights") == "weights"
    if from_weights:  # the handoff's safetensors, before DeepSpeed copies the weights; no shard is read
        load_weights(model, init_from)
    engine = build_engine(model, cfg.train)
    dtype = choice.dtype
    loss_fn = ContrastiveLoss(loss_dtype, cfg.loss.chunk_size)

    # Restore: this run's latest checkpoint, else the full state of the one given with --from
    state = TrainState()
    if checkpoint is not None:
        source = checkpoint_uri(cfg, checkpoint)
        with checkpoint.as_directory() as folder:
            state = restore(engine, folder, source)
    elif init_from and not from_weights:
        state = restore(engine, str(storage.fetch(init_from)), init_from)
    if state.step >= cfg.train.steps:
        return

    # Loop
    stream = BatchStream(
        ray.train.get_dataset_shard("train"),
        cfg.train.micro_batch_size,
        cfg.data.shuffle_buffer,
        seed=cfg.data.seed * 1_000_003 + rank,
    )
    val_shard = ray.train.get_dataset_shard("val") if loop_config.get("has_val") else None
    progress = Progress(cfg, enabled=rank == 0, emit=emitter(loop_config.get("events")), start_step=state.step)
    progress.start("GPU" if device.type == "cuda" else "CPU", choice.reason)
    accum, micro = cfg.train.grad_accum_steps, 0
    window = {"loss": 0.0, "n": 0}
    while state.step < cfg.train.steps:
        batches = iter(stream.epoch(state.epoch))
        resumed_mid_epoch = state.batches_in_epoch > 0
        for _ in range(state.batches_in_epoch):  # fast-forward to the saved data position
            next(batches, None)
        got_any = False
        while state.step < cfg.train.steps:
            wait_start = time.perf_counter()
            ok, batch = _next_batch(batches, device)
            if not ok:
                break
            got_any = True
            progress.data_wait(time.perf_counter() - wait_start)
            img, txt, scale = engine(*_inputs(batch, device, dtype))
            loss = loss_fn(img, txt, scale)
            engine.backward(loss)
            engine.step()
            state.batches_in_epoch += 1
            window["loss"] += loss.item()
            window["n"] += 1
            micro += 1
            if micro % accum:
                continue
            state.step += 1
            progress.step_done(len(batch["image"]) * accum * dist.get_world_size())
            metrics = {}
            last = state.step == cfg.train.steps
            if state.step % cfg.train.log_every == 0 or last:
                metrics = _mean_over_ranks(
                    {"loss": window["loss"] / window["n"], **stream.counters()},
                    device,
                    total=("rows_seen", "rows_skipped", "rows_dropped"),
                )
                metrics.update(temperature=1.0 / scale.float().item(), lr=engine.get_lr()[0], **progress.rates())
                window = {"loss": 0.0, "n": 0}
            if val_shard is not None and (last or (cfg.train.val_every and state.step % cfg.train.val_every == 0)):
                metrics.update(validate(engine, val_shard, cfg, dtype, loss_fn))
            if metrics:
                progress.log(state.step, metrics)
            if state.step % cfg.train.checkpoint_every == 0 or last:
                save_checkpoint(engine, model, state, cfg, tokenizer, metrics)
                progress.checkpoint(state.step)
            elif metrics:
                ray.train.report({**metrics, "step": state.step, "epoch": state.epoch})
        if not got_any and not resumed_mid_epoch:
            raise RuntimeError(
                f"data.train={cfg.data.train}: an epoch gave no full batch of "
                f"{cfg.train.micro_batch_size} rows on every worker; use more data or a smaller "
                "train.global_batch_size"
            )
        if state.step < cfg.train.steps:
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.finish()
