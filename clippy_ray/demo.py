"""The main job end to end on the embedded default: make the offline benchmark, train the tiny
CLIPpy (2 Ray Train workers, DeepSpeed ZeRO-2 bf16, CPU), export the handoff checkpoint, evaluate
it (zero-shot classification and segmentation, unsupervised grouping, robustness), report."""

from __future__ import annotations

import time

from clippy_ray import config, storage
from clippy_ray.data.benchmark import BenchmarkSpec
from clippy_ray.data.commands import make_benchmark
from clippy_ray.eval import run_eval, summary_line
from clippy_ray.model.handoff import HANDOFF_DIR
from clippy_ray.train.trainer import checkpoint_uri, fit


def run_demo(cfg: config.Config, rows: int = 2000, eval_rows: int = 256) -> dict:
    start = time.perf_counter()
    data_root = cfg.data.train.rsplit("/", 1)[0]
    if not storage.exists(storage.join(data_root, "benchmark.json")):
        print(f"[demo] making the offline grouping benchmark ({rows} train rows, "
              f"{cfg.model.image.img_size}px) in {data_root}", flush=True)
        make_benchmark(data_root, rows, eval_rows, BenchmarkSpec(seed=cfg.data.seed, image_size=cfg.model.image.img_size))
    else:
        print(f"[demo] benchmark already in {data_root}", flush=True)
    result = fit(cfg)
    checkpoint = checkpoint_uri(cfg, result)
    run = storage.join(cfg.train.storage, cfg.train.run_name)
    summary = {"data": data_root, "run": run, "checkpoint": checkpoint,
               "handoff": f"{checkpoint}/{HANDOFF_DIR}" if checkpoint else None,
               "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}}
    if checkpoint:
        out = storage.join(run, "eval", checkpoint.rstrip("/").rsplit("/", 1)[-1])
        print(f"[demo] evaluating {summary['handoff']} on {data_root}", flush=True)
        summary["eval"] = run_eval(summary["handoff"], data_root, cfg.eval, out, log=lambda m: print(f"[demo] {m}", flush=True))
        summary["eval_out"] = out
    summary["minutes"] = (time.perf_counter() - start) / 60
    return summary


def print_summary(summary: dict) -> None:
    m = summary["metrics"]
    print("\n[demo] finished in {:.1f} min".format(summary["minutes"]))
    print(f"[demo] benchmark data:      {summary['data']}")
    print(f"[demo] run (config, W&B):   {summary['run']}")
    print(f"[demo] latest checkpoint:   {summary['checkpoint']}")
    print(f"[demo] handoff model:       {summary['handoff']}")
    if m:
        print(f"[demo] step {m.get('step')}: train loss {m.get('loss', float('nan')):.3f}, "
              f"val loss {m.get('val_loss', float('nan')):.3f}, val retrieval top-1 image->text "
              f"{m.get('val_i2t_top1', float('nan')):.3f} / text->image {m.get('val_t2i_top1', float('nan')):.3f} "
              f"(chance {1 / max(m.get('val_pairs', 1), 1):.3f})")
    if summary.get("eval"):
        print(f"[demo] evaluation:          {summary_line(summary['eval']['results'])}")
        print(f"[demo] report and pictures: {summary['eval_out']}/results.md")
