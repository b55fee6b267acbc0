"""Steady-state training throughput of one worker and its MFU, for any config, on whatever device
is present: images/s, model FLOPs per sample (with and without token sub-sampling), achieved
FLOP/s, and MFU against the dense matmul peak measured in the same run in the same precision
(repetitions interleave peak and training; on CUDA also against the card's datasheet peak).

    python bench/throughput.py [--config configs/demo.yaml] [--batch 32] [--compile] [key=value ...] [--json PATH]
    python bench/throughput.py --config configs/vitb16_t5base.yaml --batch 128     # a GPU, the paper's model
"""

from __future__ import annotations

import argparse

import torch

from clippy_ray.benchmarks import common, throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    throughput.add_step_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per repetition")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--peak-size", type=int, default=None, help="matmul side for the peak (2048 CPU, 8192 GPU)")
    parser.add_argument("--peak-seconds", type=float, default=1.0)
    common.add_json_argument(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    peak_size = args.peak_size or (8192 if device.type == "cuda" else 2048)
    setup = throughput.prepare(args.config, args.overrides, args.batch, device, args.compile)
    out = throughput.run(setup, args.steps, args.warmup, args.reps, peak_size, args.peak_seconds)
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


if __name__ == "__main__":
    main()
