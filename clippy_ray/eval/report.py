"""What an evaluation leaves behind: results.json (metrics + run facts), results.md (one table,
then each task's details and the pictures) and the example pictures; plus the flat headline
numbers and the one-line summary. The tasks supply their own numbers and rows, in report order."""

from __future__ import annotations

import json
from collections.abc import Callable

from clippy_ray import storage
from clippy_ray.eval import visualize
from clippy_ray.eval.datasets import EvalSet
from clippy_ray.eval.tasks import TASKS, Task, ordered


def headline(results: dict) -> dict[str, float]:
    """The report's headline numbers, flat (what sweeps report to Tune and W&B)."""
    out: dict[str, float] = {}
    for task in ordered(results):
        out.update(task.headline(results[task.name]))
    return out


def summary_line(results: dict) -> str:
    """One number per task, e.g. "cls top-1 12.3%, seg mIoU 4.5%"."""
    return ", ".join(task.summary(results[task.name]) for task in ordered(results))


def markdown(results: dict, meta: dict) -> str:
    """results.md: the run's facts, one table of every task's numbers, per-task details, pictures."""
    lines = [
        "# clippy-ray evaluation",
        "",
        f"- checkpoint: `{meta['checkpoint']}`",
        f"- data: `{meta['data']}` ({meta['format']})",
        f"- segmentation resolution: {meta['resolution']} px (short side), background: {meta['background']}, "
        f"PCA components: {meta['pca_components']}",
        f"- workers: {meta['workers']}, wall time: {meta['seconds']:.1f} s",
        *[f"- skipped: {task} ({why})" for task, why in meta.get("skipped", {}).items()],
        "",
        "| task | metric | value | rows |",
        "|---|---|---|---|",
    ]
    tasks = ordered(results)
    for task in tasks:
        lines += task.report_rows(results[task.name])
    for task in tasks:
        lines += task.report_details(results[task.name])
    if meta.get("pictures"):
        lines += ["", "## pictures", ""] + [f"![{p}]({p})" for p in meta["pictures"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- pictures


def pictured(tasks: list[str], data: EvalSet) -> list[Task]:
    """The tasks whose example picture a run of `tasks` draws: the picture shows one of them and
    the data has its split. In report order."""
    return [
        task
        for task in TASKS.values()
        if task.picture_split and set(task.picture_shows) & set(tasks) and data.splits.get(task.picture_split)
    ]


def picture_name(task: Task) -> str:
    return f"{task.name}_examples.png"


def examples_png(task: Task, items: list[dict], data: EvalSet) -> bytes:
    """One row per item (image, prediction, then ground truth and groups where the item has
    them), with the task's legend beside the grid."""
    names, colors = task.legend(data)
    rows = []
    for item in items:
        tiles = [
            (item["key"][-24:], item["image"]),
            ("prediction", visualize.overlay(item["image"], item["pred"], colors)),
        ]
        if item.get("truth") is not None:
            tiles.append(("ground truth", visualize.overlay(item["image"], item["truth"], colors)))
        if item.get("groups") is not None:
            tiles.append(("unsupervised groups", visualize.colorize(item["groups"], visualize.palette(16))))
        rows.append(visualize.panel(tiles, height=max(128, item["image"].shape[0])))
    grid = visualize.stack(rows)
    legend = visualize.legend(names, colors, grid.shape[0])
    return visualize.png_bytes(visualize.panel([("", grid), ("legend", legend)]))


# ------------------------------------------------------------------------------- files


def write(out: str, report: dict, pictures: dict[str, bytes], log: Callable[[str], None] = print) -> None:
    """Write results.json, results.md and the pictures (name -> PNG bytes) under `out` (local or s3://)."""
    files: dict[str, bytes | str] = dict(pictures)
    files["results.json"] = json.dumps(report, indent=2, default=float)
    files["results.md"] = markdown(report["results"], report["meta"])
    for name, content in files.items():
        storage.write_bytes(storage.join(out, name), content.encode() if isinstance(content, str) else content)
    log(f"eval: wrote {', '.join(sorted(files))} to {out}")
