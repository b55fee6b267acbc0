"""Evaluation during training: the training's images/s with `eval.during_training` on against the
same run without it (interleaved repetitions, the ratio's spread), and the seconds from each
checkpoint landing to its results. Goal: >= 0.97x with the evaluation on its own CPU share.

    python bench/eval_during_training.py [--config configs/demo.yaml] [--reps 3] [key=value ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import tempfile

from clippy_ray import config
from clippy_ray.benchmarks import common, during_training
from clippy_ray.data.benchmark import BenchmarkSpec
from clippy_ray.data.commands import make_benchmark
from clippy_ray.ray_init import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=3000, help="benchmark rows to train on")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    common.add_json_argument(parser)
    args = parser.parse_args()
    defaults = ["train.steps=100", "train.checkpoint_every=25", "train.log_every=10", "train.val_every=0"]
    cfg = config.load(args.config, defaults + ["data.val=null", "train.wandb.mode=disabled", *args.overrides])
    init_ray()
    with tempfile.TemporaryDirectory(prefix="clippy-ray-bench-data-") as data:
        spec = BenchmarkSpec(seed=0, image_size=cfg.model.image.img_size)
        make_benchmark(data, args.rows, 64, spec, splits=("train", "val"))
        cfg.data.train = f"{data}/train"
        results = during_training.measure(cfg, data, args.reps)
    print(
        f"images/s with evaluation during training / without: {common.describe(results['ratio'], '{:.3f}')} "
        f"(median (min-max) of {args.reps} interleaved pairs; without: "
        f"{common.describe(results['images_per_s']['off'], '{:.1f}')}, with: "
        f"{common.describe(results['images_per_s']['on'], '{:.1f}')})"
    )
    if results["results_after_s"]:
        print(f"checkpoint on disk -> its results on disk: {common.describe(results['results_after_s'], '{:.0f}')} s")
    common.write_json(args.json, "eval_during_training", args, results)


if __name__ == "__main__":
    main()
