"""Evaluation during training: the training's images/s with `eval.during_training` on against the
same run without it (interleaved repetitions, the ratio's spread), and the seconds from each
checkpoint landing to its results. Goal: >= 0.97x with the evaluation on its own CPU share.
A run's images/s is its mean over its log windows, the first (which holds the start-up) left out.

    python bench/eval_during_training.py [--config configs/demo.yaml] [--reps 3] [key=value ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from clippy_ray import config
from clippy_ray.benchmarks import common
from clippy_ray.data.benchmark import BenchmarkSpec
from clippy_ray.data.commands import make_benchmark
from clippy_ray.ray_init import init_ray


def images_per_s(result) -> float:
    """The run's mean images/s over its log windows after the first."""
    frame = result.metrics_dataframe
    rates = frame["images_per_s"].dropna().tolist() if "images_per_s" in frame else []
    return statistics.mean(rates[1:] or rates)


def result_delays(run: Path) -> list[float]:
    """Seconds from each checkpoint's train_state.json on disk to its evaluation's results.json."""
    delays = []
    for results in sorted(run.glob("eval/step_*/results.json")):
        state = run / results.parent.name / "train_state.json"
        if state.exists():
            delays.append(results.stat().st_mtime - state.stat().st_mtime)
    return delays


def run_once(cfg: config.Config, storage: str, name: str, evaluate: bool, eval_data: str):
    from clippy_ray.train.trainer import fit

    cfg = config.from_dict(config.to_dict(cfg))
    cfg.train.storage, cfg.train.run_name = storage, name
    cfg.eval.during_training.data = eval_data if evaluate else None
    return fit(cfg)


def measure(cfg: config.Config, eval_data: str, reps: int, log=print) -> dict:
    """`reps` pairs of runs (with and without), each pair in alternating order."""
    rates: dict[str, list[float]] = {"off": [], "on": []}
    delays: list[float] = []
    with tempfile.TemporaryDirectory(prefix="clippy-ray-bench-") as tmp:
        for rep in range(reps):
            for mode in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                name = f"{mode}-{rep}"
                result = run_once(cfg, tmp, name, mode == "on", eval_data)
                rates[mode].append(images_per_s(result))
                if mode == "on":
                    delays += result_delays(Path(tmp) / name)
                log(f"rep {rep + 1}/{reps} eval {mode}: {rates[mode][-1]:.1f} images/s")
    ratios = [on / off for on, off in zip(rates["on"], rates["off"])]
    return {"images_per_s": rates, "ratio": ratios, "results_after_s": delays, "cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=3000, help="benchmark rows to train on")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    common.add_json_argument(parser)
    args = parser.parse_args(argv)
    defaults = ["train.steps=100", "train.checkpoint_every=25", "train.log_every=10", "train.val_every=0"]
    cfg = config.load(args.config, defaults + ["data.val=null", "train.wandb.mode=disabled", *args.overrides])
    init_ray()
    with tempfile.TemporaryDirectory(prefix="clippy-ray-bench-data-") as data:
        spec = BenchmarkSpec(seed=0, image_size=cfg.model.image.img_size)
        make_benchmark(data, args.rows, 64, spec, splits=("train", "val"))
        cfg.data.train = f"{data}/train"
        results = measure(cfg, data, args.reps)
    print(
        f"images/s with evaluation during training / without: {common.describe(results['ratio'], '{:.3f}')} "
        f"(median (min-max) of {args.reps} interleaved pairs; without: "
        f"{common.describe(results['images_per_s']['off'], '{:.1f}')}, with: "
        f"{common.describe(results['images_per_s']['on'], '{:.1f}')})"
    )
    if results["results_after_s"]:
        print(f"checkpoint on disk -> its results on disk: {common.describe(results['results_after_s'], '{:.0f}')} s")
    common.write_json(args.json, "eval_during_training", args, results)
