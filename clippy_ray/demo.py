"""The main job end to end on the embedded default: make the offline benchmark, train the tiny
CLIPpy (2 Ray Train workers, DeepSpeed ZeRO-2, precision by device), export the handoff checkpoint, evaluate
it (zero-shot classification and segmentation, unsupervised grouping, robustness), report."""

from __future__ import annotations

import time

from clippy_ray import config, storage
from clippy_ray.console import Console
from clippy_ray.data.benchmark import SPLITS as BENCHMARK_SPLITS
from clippy_ray.data.benchmark import BenchmarkSpec
from clippy_ray.data.commands import make_benchmark
from clippy_ray.eval import run_eval, summary_line
from clippy_ray.model.handoff import HANDOFF_DIR
from clippy_ray.train.state import checkpoint_uri
from clippy_ray.train.trainer import fit

# What the demo trains and evaluates on (train-spurious, the biased training split, is left out).
DEMO_SPLITS = tuple(s for s in BENCHMARK_SPLITS if s != "train-spurious")


def run_demo(cfg: config.Config, console: Console, rows: int = 6000, eval_rows: int = 256) -> dict:
    start = time.perf_counter()
    data_root = cfg.data.train.rsplit("/", 1)[0]
    if not storage.exists(storage.join(data_root, "benchmark.json")):
        console.line(
            f"making the offline grouping benchmark ({rows} train rows, {cfg.model.image.img_size} px) in {data_root}"
        )
        make_benchmark(
            data_root,
            rows,
            eval_rows,
            BenchmarkSpec(seed=cfg.data.seed, image_size=cfg.model.image.img_size),
            splits=DEMO_SPLITS,
        )
    else:
        console.line(f"benchmark already in {data_root}")
    if cfg.eval.during_training.data:  # each checkpoint on the benchmark's own evaluation splits
        cfg.eval.during_training.data = data_root
    result = fit(cfg, console=console)
    checkpoint = checkpoint_uri(cfg, result.checkpoint)
    run = storage.join(cfg.train.storage, cfg.train.run_name)
    summary = {
        "data": data_root,
        "run": run,
        "checkpoint": checkpoint,
        "handoff": f"{checkpoint}/{HANDOFF_DIR}" if checkpoint else None,
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
    }
    if cfg.eval.during_training.data:
        summary["curve"] = storage.join(run, "eval", "curve.md")
    if checkpoint:
        # every task on more rows than during training; beside the curve's step_XXXXXXXX folders
        out = storage.join(run, "eval", "final_" + checkpoint.rstrip("/").rsplit("/", 1)[-1])
        console.line(f"evaluating {summary['handoff']} on {data_root}")
        summary["eval"] = run_eval(
            summary["handoff"], data_root, cfg.eval, out, log=console.line, progress=console.counter("eval", "shards")
        )
        summary["eval_out"] = out
    summary["minutes"] = (time.perf_counter() - start) / 60
    return summary


def print_summary(summary: dict, console: Console) -> None:
    m = summary["metrics"]
    console.line("demo finished in {:.1f} min".format(summary["minutes"]))
    if m:
        console.line(
            f"step {m.get('step')}: train loss {m.get('loss', float('nan')):.3f}, "
            f"val loss {m.get('val_loss', float('nan')):.3f}, val retrieval top-1 image->text "
            f"{m.get('val_i2t_top1', float('nan')):.3f} / text->image {m.get('val_t2i_top1', float('nan')):.3f} "
            f"(chance {1 / max(m.get('val_pairs', 1), 1):.3f})"
        )
    if summary.get("eval"):
        console.line(f"evaluation:          {summary_line(summary['eval']['results'])}")
    if summary.get("curve"):
        console.line(f"curve (each checkpoint): {summary['curve']}")
    console.line(f"benchmark data:      {summary['data']}")
    console.line(f"run (config, W&B):   {summary['run']}")
    console.line(f"latest checkpoint:   {summary['checkpoint']}")
    console.line(f"handoff model:       {summary['handoff']}")
    if summary.get("eval"):
        console.line(f"report and pictures: {summary['eval_out']}/results.md")
