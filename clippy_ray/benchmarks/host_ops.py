"""What the host does per training step, and what engine.GroupedGradients saves of it: the operators
one worker's step dispatches (forward with the loss, backward, optimizer step), counted, and the
step's time with DeepSpeed's BF16_Optimizer as shipped (its per-parameter Python loops) against the
step as training builds it, interleaved over repetitions, on the same model, batch and device.
(With --compile, what runs inside a compiled graph is not counted.)

On a GPU whose step waits for the host, each operator is host time. A CPU stands in for that host
when the model is narrow enough that compute is small, e.g. the paper's depths at width 64:

    python bench/host_ops.py --config configs/vitb16_t5base.yaml --batch 4 --threads 1 \\
        'model.image.timm_kwargs={embed_dim: 64, num_heads: 2}' model.embed_dim=64 model.image.img_size=64 \\
        'model.text.hf_config={num_layers: 12, num_heads: 2, d_model: 64, d_kv: 32, d_ff: 128, vocab_size: 512}'
    python bench/host_ops.py --config configs/vitb16_t5base.yaml --batch 128   # a GPU, the paper's model
"""

from __future__ import annotations

import argparse

import torch

from clippy_ray.benchmarks import common, throughput


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    throughput.add_step_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per repetition")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=8, help="repetitions; the order alternates")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    common.add_json_argument(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    setup = throughput.prepare(args.config, args.overrides, args.batch, device, args.compile)
    steps = {
        "deepspeed": throughput.build_step(setup, grouped_gradients=False),
        "grouped": throughput.build_step(setup),
    }
    for step in steps.values():
        step.train_steps(args.warmup)
    operators = {name: step.count_operators() for name, step in steps.items()}
    seconds = throughput.interleaved_seconds(steps, args.reps, args.steps)
    ratios = [g / d for g, d in zip(seconds["grouped"], seconds["deepspeed"])]
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": setup.precision.precision,
        "zero_stage": setup.cfg.train.zero_stage,
        "batch_per_worker": args.batch,
        "torch_threads": torch.get_num_threads(),
        "operators": {
            name: {phase: sum(c.values()) for phase, c in phases.items()} for name, phases in operators.items()
        },
        "top_operators": {
            name: {phase: c.most_common(8) for phase, c in phases.items()} for name, phases in operators.items()
        },
        "seconds_per_step": {name: common.spread(v) for name, v in seconds.items()},
        "grouped_over_deepspeed": common.spread(ratios),
    }
    print(
        f"{' '.join([args.config, *args.overrides])}: 1 worker on {out['device']}, {out['precision']}, "
        f"ZeRO-{out['zero_stage']}, batch {args.batch}, {out['torch_threads']} threads; "
        f"{args.reps} interleaved reps of {args.steps} steps, median (min-max)"
    )
    for name in steps:
        counts = out["operators"][name]
        print(
            f"  {name:9s} operators per step {sum(counts.values()):6d} "
            f"(forward {counts['forward']}, backward {counts['backward']}, step {counts['step']}); "
            f"{common.describe([s * 1e3 for s in seconds[name]], '{:.1f}')} ms per step"
        )
    print(f"  grouped / deepspeed step time: {common.describe(ratios, '{:.3f}')}")
    common.write_json(args.json, "host_ops", args, out)
