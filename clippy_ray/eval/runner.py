"""`clippy-ray eval`: fan the tasks' shards out to a pool of Ray actors (each holds the model
once), add up their sums in shard order, and write results.json, results.md and pictures.

Shards are fixed by the dataset and eval.rows_per_shard, never by the worker count, and sums are
reduced in shard order, so 1 worker and N workers give identical numbers.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import ray
from ray.util import ActorPool
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from clippy_ray import storage
from clippy_ray.config import EvalConfig
from clippy_ray.eval import metrics, visualize
from clippy_ray.eval.datasets import EvalDataError, EvalSet, Shard, load_shard, open_eval_set, read_templates
from clippy_ray.eval.tasks import background_mode


def eval_config(checkpoint: str, overrides: list[str] | None = None, flags: dict | None = None) -> EvalConfig:
    """The checkpoint's own eval settings (from its resolved config), then `eval.key=value`
    overrides, then command-line flags."""
    import yaml

    from clippy_ray import config
    from clippy_ray.train.checkpoint import HANDOFF_DIR

    saved: dict = {}
    for name in (f"{HANDOFF_DIR}/config.yaml", "config.yaml"):
        uri = storage.join(checkpoint, name)
        if storage.exists(uri):
            saved = (yaml.safe_load(storage.fetch(uri).read_text()) or {}).get("eval") or {}
            break
    extra = config.parse_overrides(overrides or [])
    unknown = [k for k in extra if k != "eval"]
    if unknown:
        raise config.ConfigError([f"{k}: only eval.* keys can be overridden here" for k in unknown])
    data = config.merge(config.merge(saved, extra.get("eval", {})), flags or {})
    return config.from_dict({"eval": data}).eval


def resolve_templates(cfg: EvalConfig, data: EvalSet) -> list[str]:
    return read_templates(data.templates if cfg.templates == "auto" else cfg.templates)


def build_evaluator(checkpoint: str, data: EvalSet, cfg: EvalConfig, device=None):
    """Load a handoff checkpoint onto `device` and embed the dataset's class names."""
    import torch

    from clippy_ray.eval.tasks import Evaluator, device_for
    from clippy_ray.train.checkpoint import load_handoff

    model, model_cfg, tokenizer = load_handoff(checkpoint)
    device = device or device_for(cfg.use_gpu)
    model.to(device)
    with torch.no_grad():
        return Evaluator(model, tokenizer, data, cfg, device, model_cfg.model.image.img_size,
                         model.image.patch_size[0], resolve_templates(cfg, data))


@ray.remote
class EvalWorker:
    def __init__(self, checkpoint: str, data: EvalSet, cfg: EvalConfig, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.data = data
        self.evaluator = build_evaluator(checkpoint, data, cfg)
        self.rows_cache: dict = {}  # the last parquet row groups read (this worker's, this run's)

    def resolution(self) -> int:
        return self.evaluator.resolution

    def run(self, index: int, job: tuple[str, Shard]) -> tuple[int, dict]:
        task, shard = job
        return index, self.evaluator.run(task, load_shard(shard, self.data.has_background, self.rows_cache))

    def pictures(self, task: str, shard: Shard, rows: int) -> list[dict]:
        samples = load_shard(shard, self.data.has_background, self.rows_cache)[:rows]
        return self.evaluator.pictures(task, samples)


def _jobs(data: EvalSet, tasks: list[str]) -> list[tuple[str, Shard]]:
    jobs = []
    for task in tasks:
        if task == "robust":
            jobs += [("robust-matched", s) for s in data.splits["matched"]]
            jobs += [("robust-swapped", s) for s in data.splits["swapped"]]
        else:
            jobs += [(task, s) for s in data.splits["eval"]]
    return jobs


def reduce_results(data: EvalSet, jobs: list[tuple[str, Shard]], parts: list[dict]) -> dict:
    """Add up the per-shard sums (in job order) into the metrics of each task."""
    by_task: dict[str, list[dict]] = {}
    for (task, _), part in zip(jobs, parts):
        by_task.setdefault(task, []).append(part)
    names = [syn[0] for syn in data.class_names]
    out: dict[str, dict] = {}
    if "cls" in by_task:
        p = by_task["cls"]
        rows = sum(x["rows"] for x in p)
        out["cls"] = {"top1": 100 * sum(x["hits1"] for x in p) / max(rows, 1),
                      "top5": 100 * sum(x["hits5"] for x in p) / max(rows, 1), "rows": rows}
    if "seg" in by_task:
        conf = np.sum([x["confusion"] for x in by_task["seg"]], axis=0)
        iou = metrics.iou_per_class(conf)
        out["seg"] = {"miou": 100 * metrics.mean_iou(conf),
                      "pixel_accuracy": 100 * float(np.trace(conf) / max(conf.sum(), 1)),
                      "per_class_iou": {n: (None if math.isnan(v) else 100 * float(v)) for n, v in zip(names, iou)},
                      "pixels": int(conf.sum())}
    if "unsup" in by_task:
        ious = [v for x in by_task["unsup"] for v in x["ious"]]
        out["unsup"] = {"jaccard": 100 * float(np.mean(ious)) if ious else math.nan, "segments": len(ious)}
    if "robust-matched" in by_task:
        def cat(key, task):
            return np.asarray([v for x in by_task[task] for v in x[key]])

        first_fg = 1 if data.has_background else 0
        label_names = {i: names[i] for i in range(first_fg, len(names))}
        ids = sorted(label_names)
        idx = {c: i for i, c in enumerate(ids)}
        lm = np.asarray([idx.get(int(v), -1) for v in cat("labels", "robust-matched")])
        ls = np.asarray([idx.get(int(v), -1) for v in cat("labels", "robust-swapped")])
        out["robust"] = metrics.domain_gap(cat("correct", "robust-matched"), lm, cat("correct", "robust-swapped"), ls,
                                           [label_names[i] for i in ids])
        out["robust"]["rows"] = {"matched": int(len(lm)), "swapped": int(len(ls))}
    return out


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def markdown(results: dict, meta: dict) -> str:
    lines = ["# clippy-ray evaluation", "",
             f"- checkpoint: `{meta['checkpoint']}`", f"- data: `{meta['data']}` ({meta['format']})",
             f"- segmentation resolution: {meta['resolution']} px (short side), background: {meta['background']}, "
             f"PCA components: {meta['pca_components']}", f"- workers: {meta['workers']}, wall time: {meta['seconds']:.1f} s",
             "", "| task | metric | value | rows |", "|---|---|---|---|"]
    if "cls" in results:
        r = results["cls"]
        lines += [f"| cls | top-1 accuracy (%) | {_fmt(r['top1'])} | {r['rows']} |",
                  f"| cls | top-5 accuracy (%) | {_fmt(r['top5'])} | {r['rows']} |"]
    if "seg" in results:
        lines.append(f"| seg | mIoU (%) | {_fmt(results['seg']['miou'])} | {results['seg']['pixels']} px |")
    if "unsup" in results:
        lines.append(f"| unsup | Jaccard (%) | {_fmt(results['unsup']['jaccard'])} | {results['unsup']['segments']} segments |")
    if "robust" in results:
        r = results["robust"]
        rows = f"{r['rows']['matched']} + {r['rows']['swapped']}"
        lines += [f"| robust | matched accuracy (%) | {_fmt(r['matched'])} | {rows} |",
                  f"| robust | swapped accuracy (%) | {_fmt(r['swapped'])} | {rows} |",
                  f"| robust | domain gap (points) | {_fmt(r['gap'])} | {rows} |"]
    if "seg" in results:
        lines += ["", "## seg: IoU per class (%)", "", "| class | IoU |", "|---|---|"]
        lines += [f"| {n} | {_fmt(v)} |" for n, v in results["seg"]["per_class_iou"].items()]
    if "robust" in results:
        lines += ["", "## robust: accuracy per class group (%)", "", "| class | matched | swapped | gap |",
                  "|---|---|---|---|"]
        lines += [f"| {n} | {_fmt(v['matched'])} | {_fmt(v['swapped'])} | {_fmt(v['gap'])} |"
                  for n, v in results["robust"]["per_class"].items()]
    if meta.get("pictures"):
        lines += ["", "## pictures", ""] + [f"![{p}]({p})" for p in meta["pictures"]]
    return "\n".join(lines) + "\n"


def _picture_rows(items: list[dict], data: EvalSet, task: str) -> np.ndarray:
    names = [syn[0] for syn in data.class_names]
    if task == "robust":
        first_fg = 1 if data.has_background else 0
        names = names[first_fg:] + [syn[0] for syn in data.context_names]
        colors = visualize.palette(len(names))
    else:
        colors = visualize.palette(len(names), background_first=data.has_background)
    rows = []
    for item in items:
        tiles = [(item["key"][-24:], item["image"]), ("prediction", visualize.overlay(item["image"], item["pred"], colors))]
        if item.get("truth") is not None and task != "robust":
            tiles.append(("ground truth", visualize.overlay(item["image"], item["truth"], colors)))
        if item.get("groups") is not None:
            tiles.append(("unsupervised groups", visualize.colorize(item["groups"], visualize.palette(16))))
        rows.append(visualize.panel(tiles, height=max(128, item["image"].shape[0])))
    grid = visualize.stack(rows)
    return visualize.panel([("", grid), ("legend", visualize.legend(names, colors, grid.shape[0]))])


def run_eval(checkpoint: str, data_uri: str, cfg: EvalConfig, out: str | None = None, fmt: str = "auto",
             classes: str | None = None, log=print) -> dict:
    """Evaluate a handoff checkpoint on a dataset; returns (and writes under `out`) the results."""
    start = time.time()
    data = open_eval_set(data_uri, fmt, cfg.rows_per_shard, cfg.max_rows, classes)
    tasks = list(dict.fromkeys(cfg.tasks))
    why = data.tasks_supported()
    blocked = [f"{t}: {why[t]}" for t in tasks if why[t]]
    if blocked:
        raise EvalDataError("cannot run " + "; ".join(blocked) + " (choose --tasks from the ones the data supports)")
    background_mode(cfg, data)
    resolve_templates(cfg, data)
    jobs = _jobs(data, tasks)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    workers = max(1, min(cfg.workers, len(jobs)))
    threads = max(1, int(cfg.cpus_per_worker))
    # placement_group=None: inside a Tune trial the workers must not be squeezed into the trial's
    # own placement group (it holds only the trial process's CPU).
    actor_cls = EvalWorker.options(num_cpus=cfg.cpus_per_worker, num_gpus=1 if use_gpu else 0,
                                   scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    actors = [actor_cls.remote(checkpoint, data, cfg, threads) for _ in range(workers)]
    log(f"eval: {len(jobs)} shards of {data.fmt} data ({', '.join(tasks)}) on {workers} worker(s)"
        f"{' with GPUs' if use_gpu else ''}")
    resolution = ray.get([a.resolution.remote() for a in actors])[0]  # every worker has loaded the model
    ready = time.time()
    pool = ActorPool(actors)
    parts: dict[int, dict] = {}
    step = max(1, len(jobs) // 10)
    # Unordered, so a worker that finishes early takes the next shard at once; sums are then
    # added in shard order, which keeps the numbers independent of the worker count.
    for i, (index, part) in enumerate(pool.map_unordered(lambda a, job: a.run.remote(*job), enumerate(jobs)), start=1):
        parts[index] = part
        if i % step == 0 or i == len(jobs):
            log(f"eval: {i}/{len(jobs)} shards ({time.time() - start:.0f} s)")
    results = reduce_results(data, jobs, [parts[i] for i in range(len(jobs))])
    meta = {"checkpoint": checkpoint, "data": data_uri, "format": data.fmt, "tasks": tasks,
            "resolution": resolution, "background": background_mode(cfg, data), "pca_components": cfg.pca_components,
            "workers": workers, "setup_seconds": ready - start, "task_seconds": time.time() - ready, "pictures": []}
    files: dict[str, bytes | str] = {}
    if cfg.examples and out:
        for task, split in (("seg", "eval"), ("robust", "swapped")):
            if (task in tasks or (task == "seg" and "unsup" in tasks)) and data.splits.get(split):
                items = ray.get(actors[0].pictures.remote(task, data.splits[split][0], cfg.examples))
                name = f"{task}_examples.png"
                files[name] = visualize.png_bytes(_picture_rows(items, data, task))
                meta["pictures"].append(name)
    for a in actors:
        ray.kill(a)
    meta["seconds"] = time.time() - start
    report = {"results": results, "meta": meta}
    if out:
        files["results.json"] = json.dumps(report, indent=2, default=float)
        files["results.md"] = markdown(results, meta)
        for name, content in files.items():
            storage.write_bytes(storage.join(out, name), content.encode() if isinstance(content, str) else content)
        log(f"eval: wrote {', '.join(sorted(files))} to {out}")
    return report


def headline(results: dict) -> dict[str, float]:
    """The report's headline numbers, flat (what sweeps report to Tune and W&B)."""
    out = {}
    if "cls" in results:
        out.update(cls_top1=results["cls"]["top1"], cls_top5=results["cls"]["top5"])
    if "seg" in results:
        out["seg_miou"] = results["seg"]["miou"]
    if "unsup" in results:
        out["unsup_jaccard"] = results["unsup"]["jaccard"]
    if "robust" in results:
        out.update(robust_gap=results["robust"]["gap"], robust_matched=results["robust"]["matched"],
                   robust_swapped=results["robust"]["swapped"])
    return out


def summary_line(results: dict) -> str:
    h = headline(results)
    formats = (("cls_top1", "cls top-1 {:.1f}%"), ("seg_miou", "seg mIoU {:.1f}%"),
               ("unsup_jaccard", "unsup Jaccard {:.1f}%"), ("robust_gap", "robust gap {:.1f} pts"))
    return ", ".join(fmt.format(h[key]) for key, fmt in formats if key in h)

