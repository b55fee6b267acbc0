"""Peak memory and time of the fused blockwise contrastive loss against OpenCLIP's local loss
(plain autograd over the full [local, global] logits), one simulated rank of a large global
batch, in the same run: warm-up, then interleaved pairs. Goals: memory <= 0.25x, time <= 1.0x.

    python bench/loss_memory.py [--batch 32768] [--ranks 8] [--dim 768] [--reps 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from clippy_ray.benchmarks import common
from clippy_ray.benchmarks.common import PeakMemory, spread, synchronize
from clippy_ray.loss import auto_block, blockwise_loss, reference_loss
from clippy_ray.precision import TORCH_DTYPES


def rank_inputs(batch: int, ranks: int, dim: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """One rank's view: its local image/text rows [batch/ranks, dim] and the gathered columns
    [batch, dim] (separate leaves, as the all-gather hands them over), unit norm, float32."""
    g = torch.Generator().manual_seed(seed)
    local = batch // ranks
    all_image = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device)
    all_text = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device)
    return [all_image[:local].clone(), all_text[:local].clone(), all_image, all_text]


def losses(dtype: torch.dtype, block: int | None) -> dict[str, Callable]:
    """name -> fn(image, text, all_image, all_text, scale) for this rank (rank 0: offset 0)."""
    return {
        "reference": lambda *t: reference_loss(*t, 0, dtype),
        "fused": lambda *t: blockwise_loss(*t, 0, dtype, block),
    }


def measure(fn: Callable, inputs: list[torch.Tensor], scale: torch.Tensor) -> dict:
    """One forward + backward: {seconds, peak_bytes (above the inputs), loss}. Inputs that are one
    tensor (one process: the gathered columns are the local rows) stay one leaf."""
    first = {}
    leaves = [first.setdefault(id(t), t.detach().requires_grad_()) for t in inputs]
    device = inputs[0].device
    with PeakMemory(device) as memory:
        synchronize(device)
        start = time.perf_counter()
        loss = fn(*leaves, scale)
        loss.backward()
        synchronize(device)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": memory.peak, "loss": loss.item()}


def run(batch: int, ranks: int, dim: int, block: int | None, dtype: torch.dtype, reps: int, device: torch.device):
    """Warm-up, then `reps` interleaved (reference, fused) pairs -> per-candidate spreads and the
    per-rep ratios fused / reference."""
    inputs = rank_inputs(batch, ranks, dim, device)
    scale = torch.tensor([1 / 0.07], device=device)
    candidates = losses(dtype, block)
    for fn in candidates.values():  # kernel selection (oneDNN builds a kernel per shape), page faults
        measure(fn, inputs, scale)
    runs: dict[str, list[dict]] = {name: [] for name in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            runs[name].append(measure(fn, inputs, scale))
    out = {}
    for name, rs in runs.items():
        out[name] = {key: spread([r[key] for r in rs]) for key in ("seconds", "peak_bytes", "loss")}
    ratios = {}
    for key in ("seconds", "peak_bytes"):
        if runs["fused"][0][key] is not None:
            ratios[key] = spread([f[key] / r[key] for f, r in zip(runs["fused"], runs["reference"])])
    out["fused_over_reference"] = ratios
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32768, help="global batch (the gathered columns)")
    parser.add_argument("--ranks", type=int, default=8, help="simulated ranks; this one holds batch/ranks rows")
    parser.add_argument("--dim", type=int, default=768, help="embedding width (the paper's ViT-B/16: 768)")
    parser.add_argument("--block", type=int, default=None, help="columns per block (default: automatic)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="matmul dtype")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_json_argument(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    local = args.batch // args.ranks
    block = args.block or auto_block(local, args.batch, device)
    out = run(args.batch, args.ranks, args.dim, args.block, TORCH_DTYPES[args.dtype], args.reps, device)
    print(
        f"one rank of {args.ranks}: local {local} x global {args.batch} x dim {args.dim}, {args.dtype} matmul, "
        f"fused blocks of {block} columns, {device.type}, {args.reps} interleaved reps after a warm-up; "
        "median (min-max)"
    )
    mib = lambda values: [v / 2**20 for v in values]  # noqa: E731
    for name in ("reference", "fused"):
        r = out[name]
        memory = r["peak_bytes"]["values"]
        memory = common.describe(mib(memory), "{:.0f}") + " MiB" if memory[0] is not None else "n/a"
        ms = common.describe([x * 1e3 for x in r["seconds"]["values"]], "{:.1f}")
        print(f"  {name:9s}  peak memory {memory}   fwd+bwd {ms} ms   loss {r['loss']['median']:.6f}")
    ratios = out["fused_over_reference"]
    if "peak_bytes" in ratios:
        memory = common.describe(ratios["peak_bytes"]["values"], "{:.3f}")
        print(f"  fused / reference: peak memory {memory}x (goal <= 0.25)")
    print(f"  fused / reference: time        {common.describe(ratios['seconds']['values'])}x (goal <= 1.0)")
    shown = {k: v for k, v in vars(args).items() if v is not None and k != "json"}
    print("reproduce: python bench/loss_memory.py " + " ".join(f"--{k} {v}" for k, v in shown.items()))
    common.write_json(args.json, "loss_memory", args, out)
