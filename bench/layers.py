"""What model.layers saves: one worker's training step with the towers' layers as the model builds
them (the patch embedding as a matmul; on a CPU the dropout mask drawn as 16-bit integers, T5's
eager attention and its RMS norm as one autograd function) against the same step with torch's
nn.Conv2d and nn.Dropout, T5LayerNorm and the encoder's SDPA attention, interleaved over
repetitions, on the same model, batch and device; and each layer alone, forward and backward, at
the step's shapes.

    python bench/layers.py --config configs/vitb16_t5base.yaml --batch 128 --steps 2 \\
        'model.image.timm_kwargs={depth: 2}' \\
        'model.text.hf_config={num_layers: 2, num_heads: 12, d_model: 768, d_kv: 64, d_ff: 3072, vocab_size: 32128}'
"""

from __future__ import annotations

import argparse

import torch

from clippy_ray.benchmarks import common, throughput
from clippy_ray.benchmarks.layers import layer_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    throughput.add_step_arguments(parser)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per repetition")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=6, help="repetitions; the order alternates")
    common.add_json_argument(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    setup = throughput.prepare(args.config, args.overrides, args.batch, device, args.compile)
    layers = layer_seconds(setup, args.reps)
    steps = {"torch": throughput.build_step(setup, swapped_layers=False), "swapped": throughput.build_step(setup)}
    for step in steps.values():
        step.train_steps(args.warmup)
    seconds = throughput.interleaved_seconds(steps, args.reps, args.steps)
    ratios = [s / t for s, t in zip(seconds["swapped"], seconds["torch"])]
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": setup.precision.precision,
        "batch_per_worker": args.batch,
        "layers": {
            name: {
                "shape": v["shape"],
                "seconds": {k: common.spread(s) for k, s in v["seconds"].items()},
                "swapped_over_torch": common.spread(v["ratios"]),
            }
            for name, v in layers.items()
        },
        "seconds_per_step": {name: common.spread(v) for name, v in seconds.items()},
        "swapped_over_torch": common.spread(ratios),
    }
    print(
        f"{' '.join([args.config, *args.overrides])}: 1 worker on {out['device']}, {out['precision']}, "
        f"batch {args.batch}; {args.reps} interleaved reps, median (min-max)"
    )
    for name, v in layers.items():
        times = {k: common.describe([s * 1e3 for s in t], "{:.1f}") for k, t in v["seconds"].items()}
        print(
            f"  {name:26s} {str(v['shape']):18s} torch {times['torch']} ms, swapped {times['swapped']} ms, "
            f"ratio {common.describe(v['ratios'], '{:.3f}')}"
        )
    for name in steps:
        print(f"  training step, {name:8s} {common.describe([s * 1e3 for s in seconds[name]], '{:.0f}')} ms")
    print(f"  swapped / torch step time: {common.describe(ratios, '{:.3f}')}")
    common.write_json(args.json, "layers", args, out)


if __name__ == "__main__":
    main()
