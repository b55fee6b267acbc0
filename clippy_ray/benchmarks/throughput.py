"""Steady-state training throughput of one worker and its MFU, for any config, on whatever device
is present: images/s, model FLOPs per sample (with and without token sub-sampling), achieved
FLOP/s, and MFU against the dense matmul peak measured in the same run in the same precision
(repetitions interleave peak and training; on CUDA also against the card's datasheet peak).

    python bench/throughput.py [--config configs/demo.yaml] [--batch 32] [--compile] [key=value ...] [--json PATH]
    python bench/throughput.py --config configs/vitb16_t5base.yaml --batch 128     # a GPU, the paper's model

One process runs the real per-worker step (the DeepSpeed engine of the config's ZeRO stage and
precision, the fused loss, the optimizer) on a fixed synthetic batch; no data loading, no other
workers. Model FLOPs per sample are counted from the model with torch.utils.flop_counter: 3x the
forward (matmuls, convolutions, attention; backward = 2x forward), with the config's token
sub-sampling and without it. MFU = achieved model FLOP/s / the dense matmul peak of the same
device in the same precision, measured in the same run (and, on CUDA, / the card's datasheet peak).
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from clippy_ray import config, precision
from clippy_ray.benchmarks import common
from clippy_ray.benchmarks.common import OperatorCounts, spread, synchronize
from clippy_ray.data.transforms import normalize
from clippy_ray.loss import ContrastiveLoss
from clippy_ray.model import build_model
from clippy_ray.model.layers import restore_layers
from clippy_ray.tokenizer import build_tokenizer

# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, TFLOP/s; fp32 without TF32.
# Matched against torch.cuda.get_device_name() in this order (L40S before L4).
DATASHEET_TFLOPS = (
    ("H200", {"bf16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp32": 67.0}),  # SXM
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp32": 30.3}),
)
# torch.utils.flop_counter has no formula for the CPU flash-attention kernel timm's ViT runs
_EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, out_shape=None, **__: (
        sdpa_flop_count(q, k, v)
    )
}


def add_step_arguments(parser) -> None:
    """The options of the benches that build the training step (build_step): config, overrides,
    batch, device and --compile."""
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.image.timm_kwargs={depth: 2}")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--batch", type=int, default=32, help="pairs per step on this worker")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="as train.compile=true: torch.compile the model")


def datasheet_tflops(device: torch.device, precision_name: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks[precision_name] for key, peaks in DATASHEET_TFLOPS if key in name), None)


def synthetic_batch(cfg: config.Config, batch: int, dtype: torch.dtype, device: torch.device):
    """Noise images at the training size and captions of varied length, tokenized as training does."""
    g = torch.Generator().manual_seed(0)
    size = cfg.model.image.img_size
    images = torch.randint(0, 255, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    words = ["a", "small", "red", "star", "next", "to", "two", "blue", "rings", "on", "grey", "ground"]
    captions = [" ".join(words[(i + j) % len(words)] for j in range(4 + i % 9)) for i in range(batch)]
    enc = build_tokenizer(cfg.model.text)(captions)
    return (
        normalize(images.to(device), dtype),
        torch.from_numpy(enc["input_ids"]).to(device),
        torch.from_numpy(enc["attention_mask"]).to(device),
    )


def forward_flops(model: torch.nn.Module, inputs, loss_fn: ContrastiveLoss) -> int:
    """FLOPs of one forward of the model and the loss on `inputs`, in train mode."""
    model.train()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        loss_fn(*model(*inputs))
    return counter.get_total_flops()


def model_flops_per_sample(model, inputs, loss_fn: ContrastiveLoss) -> dict[str, float]:
    """Training FLOPs per sample (3x forward): as configured, and with every patch token kept."""
    batch = inputs[0].shape[0]
    image = model.image
    as_trained = 3 * forward_flops(model, inputs, loss_fn) / batch
    keep = (image.keep_ratio, image.keep_count)
    image.keep_ratio = image.keep_count = None
    try:
        all_tokens = 3 * forward_flops(model, inputs, loss_fn) / batch
    finally:
        image.keep_ratio, image.keep_count = keep
    return {"as_trained": as_trained, "all_tokens": all_tokens}


@dataclass
class Setup:
    cfg: config.Config
    device: torch.device
    precision: precision.Choice
    batch: int


def prepare(
    config_path: str, overrides: list[str], batch: int, device: torch.device, compile_model: bool = False
) -> Setup:
    """The config as one worker with `batch` pairs per step in a one-rank process group (what Ray
    Train gives each worker), precision resolved for `device` as training resolves it.
    `compile_model`: as train.compile=true (checked with the rest of the config)."""
    import torch.distributed as dist

    from clippy_ray.train.loop import agree_precision

    cfg = config.load(
        config_path,
        [
            *overrides,
            *(["train.compile=true"] if compile_model else []),
            "train.num_workers=1",
            f"train.global_batch_size={batch}",
            "train.grad_accum_steps=1",
            f"train.use_gpu={device.type == 'cuda'}",
        ],
    )
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    choice = agree_precision(cfg.train.precision, device, cfg.train.zero_stage)
    cfg.train.precision = choice.precision
    return Setup(cfg, device, choice, batch)


@dataclass
class Step:
    """The worker's training step, built: `train_steps(n)` runs n steps and returns the seconds;
    `count_operators()` runs one, counting the operators each phase dispatches."""

    train_steps: Callable[[int], float]
    flops: dict[str, float]
    parameters: int
    count_operators: Callable[[], dict[str, Counter]]


def build_step(setup: Setup, grouped_gradients: bool = True, swapped_layers: bool = True) -> Step:
    """Model, loss and DeepSpeed engine as a training worker builds them, on one synthetic batch.
    With train.compile the model is compiled in place (DeepSpeed's engine.compile), in the first
    steps. `grouped_gradients=False`: DeepSpeed's BF16_Optimizer as shipped (engine.GroupedGradients).
    `swapped_layers=False`: torch's dropout and patch convolution, T5's RMS norm and the text
    encoder's own attention instead of model.layers' (bench/layers.py)."""
    from clippy_ray.train.engine import build_engine

    cfg, device = setup.cfg, setup.device
    chosen = setup.precision.precision
    loss_fn = ContrastiveLoss(precision.matmul_dtype(cfg.loss.matmul_dtype, chosen), cfg.loss.chunk_size)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, build_tokenizer(cfg.model.text).vocab_size).to(device)
    if not swapped_layers:  # before the engine: ZeRO-3 hooks the modules it finds
        restore_layers(model)
    params = sum(p.numel() for p in model.parameters())
    flops = model_flops_per_sample(model, synthetic_batch(cfg, setup.batch, torch.float32, device), loss_fn)
    engine = build_engine(model, cfg.train, grouped_gradients=grouped_gradients)
    if not swapped_layers:  # after the engine's .to(), which picks the text tower's CPU attention again
        model.text.encoder.set_attn_implementation(model.text.attention)
    inputs = synthetic_batch(cfg, setup.batch, precision.TORCH_DTYPES[chosen], device)

    def train_steps(n: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            loss = loss_fn(*engine(*inputs))
            engine.backward(loss)
            engine.step()
        synchronize(device)
        return time.perf_counter() - start

    def count_operators() -> dict[str, Counter]:
        phases = {"forward": OperatorCounts(), "backward": OperatorCounts(), "step": OperatorCounts()}
        with phases["forward"]:
            loss = loss_fn(*engine(*inputs))
        with phases["backward"]:
            engine.backward(loss)
        with phases["step"]:
            engine.step()
        return {name: mode.counts for name, mode in phases.items()}

    return Step(train_steps, flops, params, count_operators)


def run(setup: Setup, steps: int, warmup: int, reps: int, peak_size: int, peak_seconds: float) -> dict:
    """Warm-up (compilation included), then `reps` x (`steps` timed training steps between two
    measurements of the dense matmul peak): each repetition's MFU is against the mean of the peaks
    that bracket it, so a machine whose speed drifts (a shared or throttled CPU) compares its steps
    with its peak of the same moment; `peak_drift` is each repetition's |after - before| / before;
    `mfu_at_highest_peaks` the MFU of the least contended quarter of the repetitions."""
    cfg, device, chosen = setup.cfg, setup.device, setup.precision.precision
    dtype = precision.TORCH_DTYPES[chosen]
    step = build_step(setup)
    flops = step.flops
    warmup_seconds = step.train_steps(warmup)

    def peak() -> float:
        return precision.matmul_gflops(dtype, peak_size, peak_seconds, str(device)) * 1e9

    bracket, rates = [peak()], []
    for _ in range(reps):
        rates.append(setup.batch * steps / step.train_steps(steps))
        bracket.append(peak())
    peaks = [(a + b) / 2 for a, b in zip(bracket, bracket[1:])]
    achieved = [r * flops["as_trained"] for r in rates]
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": chosen,
        "precision_reason": setup.precision.reason,
        "zero_stage": cfg.train.zero_stage,
        "batch_per_worker": setup.batch,
        "compiled": cfg.train.compile,
        "warmup_seconds": warmup_seconds,
        "parameters": step.parameters,
        "model_flops_per_sample": flops,
        "images_per_s": spread(rates),
        "achieved_flops": spread(achieved),
        "matmul_peak_flops": spread(peaks),
        "matmul_peak_size": peak_size,
        "peak_drift": spread([abs(b - a) / a for a, b in zip(bracket, bracket[1:])]),
        "mfu_vs_measured_peak": spread([a / p for a, p in zip(achieved, peaks)]),
        "mfu_at_highest_peaks": mfu_at_highest_peaks(achieved, peaks),
    }
    sheet = datasheet_tflops(device, chosen)
    if sheet:
        out["datasheet_peak_flops"] = sheet * 1e12
        out["mfu_vs_datasheet"] = spread([a / (sheet * 1e12) for a in achieved])
    return out


def mfu_at_highest_peaks(achieved: list[float], peaks: list[float]) -> dict:
    """The MFU of the quarter of repetitions (at least one) with the highest bracketing peak, and
    that quarter's lowest peak. On a host shared with other machines the matmul peak moves with
    their load more than the training step does (the step's memory-bound work slows less than its
    matmuls), so MFU reads higher when the host is busy; these are the least contended
    repetitions. Chosen by the measured peak, which is itself noisy, so the quarter leans to
    repetitions whose peak read high: this figure leans low."""
    ranked = sorted(zip(peaks, achieved), reverse=True)[: max(1, len(peaks) // 4)]
    return {**spread([a / p for p, a in ranked]), "lowest_peak_flops": ranked[-1][0]}


def interleaved_seconds(steps: dict[str, Step], reps: int, n: int) -> dict[str, list[float]]:
    """Seconds per training step of each built step, `reps` times `n` steps, the order alternating
    so that a machine's drift lands on every step alike."""
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(reps):
        for name in list(steps) if rep % 2 == 0 else list(reversed(steps)):
            seconds[name].append(steps[name].train_steps(n) / n)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per repetition")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--peak-size", type=int, default=None, help="matmul side for the peak (2048 CPU, 8192 GPU)")
    parser.add_argument("--peak-seconds", type=float, default=1.0)
    common.add_json_argument(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    peak_size = args.peak_size or (8192 if device.type == "cuda" else 2048)
    setup = prepare(args.config, args.overrides, args.batch, device, args.compile)
    out = run(setup, args.steps, args.warmup, args.reps, peak_size, args.peak_seconds)
    flops, image = out["model_flops_per_sample"], setup.cfg.model
    keep = f"keep ratio {image.token_keep_ratio}" if image.token_keep_ratio else f"keep {image.token_keep_count}"
    g = lambda x: f"{x / 1e9:.1f}"  # noqa: E731
    print(
        f"{' '.join([args.config, *args.overrides])}: 1 worker on {out['device']}, {out['precision']} "
        f"({setup.precision.reason}), ZeRO-{out['zero_stage']}, batch {args.batch}, "
        f"{out['parameters'] / 1e6:.1f}M parameters{', compiled' if out['compiled'] else ''}; "
        f"{args.reps} reps of {args.steps} steps after {args.warmup}, "
        "median (min-max)"
    )
    print(
        f"  model FLOPs per sample (3x forward): {g(flops['as_trained'])} GFLOP as trained "
        f"(tokens: {keep if image.token_keep_ratio or image.token_keep_count else 'all'}), "
        f"{g(flops['all_tokens'])} GFLOP with every token"
    )
    print(f"  images/s per worker:   {common.describe(out['images_per_s']['values'], '{:.1f}')}")
    print(f"  achieved GFLOP/s:      {common.describe([x / 1e9 for x in out['achieved_flops']['values']], '{:.0f}')}")
    print(
        f"  dense matmul peak:     {common.describe([x / 1e9 for x in out['matmul_peak_flops']['values']], '{:.0f}')} "
        f"GFLOP/s ({out['precision']}, {peak_size}x{peak_size}, this device, this run; each the mean of the two "
        f"bracketing a repetition, which differed by {common.describe(out['peak_drift']['values'], '{:.0%}')})"
    )
    print(f"  MFU vs measured peak:  {common.describe(out['mfu_vs_measured_peak']['values'], '{:.3f}')}")
    quiet = out["mfu_at_highest_peaks"]
    print(
        f"  MFU, quietest quarter: {common.describe(quiet['values'], '{:.3f}')} (the {len(quiet['values'])} "
        f"repetitions with the highest peaks, >= {quiet['lowest_peak_flops'] / 1e9:.0f} GFLOP/s: on a shared "
        "host MFU reads higher while neighbours slow the matmul peak)"
    )
    if "mfu_vs_datasheet" in out:
        print(
            f"  MFU vs datasheet:      {common.describe(out['mfu_vs_datasheet']['values'], '{:.3f}')} "
            f"({out['datasheet_peak_flops'] / 1e12:.0f} TFLOP/s)"
        )
    shown = [
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in vars(args).items()
        if v is not None and v is not False and k not in ("json", "overrides")
    ]
    print("reproduce: python bench/throughput.py " + " ".join(shown + [repr(o) for o in args.overrides]))
    common.write_json(args.json, "throughput", args, out)
