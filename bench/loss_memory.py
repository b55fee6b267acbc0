"""Peak memory and time of the fused blockwise contrastive loss against OpenCLIP's local loss
(plain autograd over the full [local, global] logits), one simulated rank of a large global
batch, in the same run: warm-up, then interleaved pairs. Goals: memory <= 0.25x, time <= 1.0x.

    python bench/loss_memory.py [--batch 32768] [--ranks 8] [--dim 768] [--reps 3] [--json PATH]
"""

from __future__ import annotations

import argparse

import torch

from clippy_ray.benchmarks import common
from clippy_ray.benchmarks.loss import run
from clippy_ray.loss import auto_block
from clippy_ray.precision import TORCH_DTYPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32768, help="global batch (the gathered columns)")
    parser.add_argument("--ranks", type=int, default=8, help="simulated ranks; this one holds batch/ranks rows")
    parser.add_argument("--dim", type=int, default=768, help="embedding width (the paper's ViT-B/16: 768)")
    parser.add_argument("--block", type=int, default=None, help="columns per block (default: automatic)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="matmul dtype")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_json_argument(parser)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
