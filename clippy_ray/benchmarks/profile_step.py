"""Where one worker's training step spends its time: torch.profiler over the step bench/throughput.py
times (the same model, DeepSpeed engine and synthetic batch), after a warm-up. Prints wall time per
step (the profiler's own overhead included: take step times from bench/throughput.py), the device's
busy time per step (on CUDA: the sum of kernel times; the rest is the GPU waiting for the host),
and the top kernels (CUDA) or operators by their own CPU time (CPU).

    python bench/profile_step.py [--config configs/demo.yaml] [--batch 32] [key=value ...] [--json PATH]
    python bench/profile_step.py --config configs/vitb16_t5base.yaml --batch 128     # a GPU
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from clippy_ray.benchmarks import common, throughput


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    throughput.add_step_arguments(parser)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    common.add_json_argument(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    setup = throughput.prepare(args.config, args.overrides, args.batch, device, args.compile)
    step = throughput.build_step(setup)
    step.train_steps(args.warmup)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        wall = step.train_steps(args.steps)
    events = prof.key_averages()
    if cuda:  # kernels, copies and memsets: the events that run on the device
        device_type = torch.autograd.DeviceType.CUDA
        timed = [e for e in events if e.device_type == device_type and not e.is_user_annotation]
        attr = "self_device_time_total"
    else:  # operators, by the CPU time spent in each one itself
        timed, attr = list(events), "self_cpu_time_total"
    busy = sum(getattr(e, attr) for e in timed) / 1e6  # microseconds -> seconds
    ops = sorted(timed, key=lambda e: getattr(e, attr), reverse=True)[: args.top]
    table = [{"name": e.key, "seconds": getattr(e, attr) / 1e6, "calls": e.count} for e in ops]
    out = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "precision": setup.precision.precision,
        "batch_per_worker": args.batch,
        "compiled": setup.cfg.train.compile,
        "steps": args.steps,
        "wall_s_per_step": wall / args.steps,
        "device_busy_s_per_step": busy / args.steps,
        "top": table,
    }
    where = "GPU kernel time" if cuda else "operator self time (all threads' CPU time)"
    print(
        f"{' '.join([args.config, *args.overrides])}: {out['device']}, {out['precision']}, batch {args.batch}, "
        f"{args.steps} profiled steps after {args.warmup}"
    )
    print(f"  wall per step {wall / args.steps * 1e3:.1f} ms; {where} per step {busy / args.steps * 1e3:.1f} ms")
    for row in table:
        share = row["seconds"] / busy if busy else 0.0
        print(
            f"  {share:6.1%}  {row['seconds'] / args.steps * 1e3:8.2f} ms/step  {row['calls']:6d}x  {row['name'][:90]}"
        )
    common.write_json(args.json, "profile_step", args, out)
