"""Wall time of the zero-shot segmentation task on the benchmark's val split with 1 vs N Ray
workers (the tiny model of configs/demo.yaml, randomly initialized: speed does not depend on the
weights). Prints the speed-up (goal >= 1.8x with 2 workers on 2 cores). Wall time includes
starting the actors and loading the model, as a user's `clippy-ray eval` pays them.

    python bench/eval_scaling.py [--rows 1024] [--workers 2] [--resolution 128] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from clippy_ray import config
from clippy_ray.benchmarks import common
from clippy_ray.data.benchmark import BenchmarkSpec
from clippy_ray.data.commands import make_benchmark
from clippy_ray.eval import run_eval
from clippy_ray.model import build_model
from clippy_ray.model.handoff import export_handoff
from clippy_ray.ray_init import init_ray
from clippy_ray.tokenizer import build_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--config", default="configs/demo.yaml")
    common.add_json_argument(parser)
    args = parser.parse_args(argv)

    init_ray()
    cfg = config.load(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/data"
        make_benchmark(
            data,
            rows=0,
            eval_rows=args.rows,
            spec=BenchmarkSpec(image_size=cfg.model.image.img_size),
            rows_per_shard=128,
            splits=("val",),
        )
        tok = build_tokenizer(cfg.model.text)
        torch.manual_seed(0)
        model = build_model(cfg.model, tok.vocab_size)
        export_handoff(model, model.state_dict(), cfg, tok, f"{tmp}/model")
        timings, tasks, results = {}, {}, {}
        for workers in (1, args.workers):
            ecfg = config.from_dict(
                {
                    "eval": {
                        "tasks": ["seg"],
                        "workers": workers,
                        "resolution": args.resolution,
                        "examples": 0,
                        "rows_per_shard": 32,
                    }
                }
            ).eval
            start = time.perf_counter()
            report = run_eval(f"{tmp}/model", data, ecfg, log=lambda *_: None)
            timings[workers] = time.perf_counter() - start
            tasks[workers] = report["meta"]["task_seconds"]
            results[workers] = report["results"]
    same = json.dumps(results[1], sort_keys=True) == json.dumps(results[args.workers], sort_keys=True)
    print(
        f"seg task, {args.rows} rows at {args.resolution}px, {cfg.model.image.name} "
        f"(depth {cfg.model.image.timm_kwargs.get('depth')}, width {cfg.model.image.timm_kwargs.get('embed_dim')})"
    )
    n = args.workers
    for w in (1, n):
        print(
            f"  {w} worker(s): {timings[w]:.1f} s wall, of which {timings[w] - tasks[w]:.1f} s start-up "
            f"(actors + model load) and {tasks[w]:.1f} s on shards ({args.rows / tasks[w]:.1f} images/s)"
        )
    print(
        f"  speed-up, shards: {tasks[1] / tasks[n]:.2f}x (goal >= 1.8x with 2 workers on 2 cores); "
        f"whole command: {timings[1] / timings[n]:.2f}x; identical metrics: {same}"
    )
    print(
        f"  reproduce: python bench/eval_scaling.py --rows {args.rows} --workers {args.workers} "
        f"--resolution {args.resolution}"
    )
    results = {
        "wall_seconds": timings,
        "shard_seconds": tasks,
        "speedup_shards": tasks[1] / tasks[n],
        "speedup_command": timings[1] / timings[n],
        "identical_metrics": same,
    }
    common.write_json(args.json, "eval_scaling", args, results)
