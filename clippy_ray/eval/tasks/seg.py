"""Zero-shot segmentation: the similarity of each location's dense feature to each class
embedding, bilinearly upsampled to the mask, argmax (with the dataset's background mode). mIoU
from the confusion counts summed over the split, never averaged per shard.

Beside the mIoU, what it has to be read against, on the same pixels: the IoU of background and the
mIoU of the foreground classes alone; the mIoU under the other background mode (class prompts vs a
threshold); and a floor that needs no model, every pixel painted with the class of the image's
largest object (it uses the truth, so a model that only classifies can reach it)."""

from __future__ import annotations

import math

import numpy as np

from clippy_ray.eval import metrics, visualize
from clippy_ray.eval.datasets import EvalDataError, EvalSet, Sample
from clippy_ray.eval.evaluator import Evaluator
from clippy_ray.eval.tasks.base import Task, class_names, fmt


class Segmentation(Task):
    name = "seg"
    picture_split = "eval"
    picture_shows = ("seg", "unsup")  # prediction, ground truth and the unsupervised groups

    def run(self, ev: Evaluator, samples: list[Sample]) -> dict:
        n = len(ev.data.class_names)
        other = _other_mode(ev.background) if ev.data.has_background else None
        conf, conf_other, conf_floor = (np.zeros((n, n), np.int64) for _ in range(3))
        for sample, dense in ev.dense(samples):
            if sample.mask is None:
                raise EvalDataError(f"row {sample.key}: no mask; the seg task needs a mask for every row")
            conf += metrics.confusion(ev.predict(sample, dense), sample.mask, n)
            if other:
                conf_other += metrics.confusion(ev.predict(sample, dense, other), sample.mask, n)
            floor = metrics.largest_object_map(sample.mask, ev.data.has_background)
            conf_floor += metrics.confusion(floor, sample.mask, n)
        return {"confusion": conf, "confusion_other_mode": conf_other, "confusion_floor": conf_floor, "other": other}

    def reduce(self, parts: dict[str, list[dict]], data: EvalSet) -> dict:
        def total(key):
            return np.sum([x[key] for x in parts["eval"]], axis=0)

        conf = total("confusion")
        iou = metrics.iou_per_class(conf)
        out = {
            "miou": 100 * metrics.mean_iou(conf),
            "pixel_accuracy": 100 * float(np.trace(conf) / max(conf.sum(), 1)),
            "per_class_iou": {n: (None if math.isnan(v) else 100 * float(v)) for n, v in zip(class_names(data), iou)},
            "pixels": int(conf.sum()),
            **_background_split(conf, data.has_background),
        }
        other = parts["eval"][0]["other"] if parts["eval"] else None
        if other:
            out["other_mode"] = {"background": other, "miou": 100 * metrics.mean_iou(total("confusion_other_mode"))}
        floor = total("confusion_floor")
        out["floor_largest_object"] = {
            "miou": 100 * metrics.mean_iou(floor),
            **_background_split(floor, data.has_background),
        }
        return out

    def headline(self, metrics: dict) -> dict[str, float]:
        return {"seg_miou": metrics["miou"]}

    def summary(self, metrics: dict) -> str:
        return f"seg mIoU {metrics['miou']:.1f}%"

    def report_rows(self, metrics: dict) -> list[str]:
        return [f"| seg | mIoU (%) | {fmt(metrics['miou'])} | {metrics['pixels']} px |"]

    def report_details(self, metrics: dict) -> list[str]:
        floor = metrics.get("floor_largest_object")
        lines = ["", "## seg: what the mIoU is read against (%)", "", "| | mIoU | background IoU | foreground mIoU |"]
        lines.append("|---|---|---|---|")
        rows = [("this model", metrics)]
        if floor:
            rows.append(("floor: every pixel the image's largest object (from the truth)", floor))
        for name, m in rows:
            lines.append(
                f"| {name} | {fmt(m['miou'])} | {fmt(m.get('background_iou'))} | {fmt(m.get('foreground_miou'))} |"
            )
        if metrics.get("other_mode"):
            other = metrics["other_mode"]
            lines.append(f"| this model, background by {other['background']} | {fmt(other['miou'])} | | |")
        return (
            lines
            + ["", "## seg: IoU per class (%)", "", "| class | IoU |", "|---|---|"]
            + [f"| {n} | {fmt(v)} |" for n, v in metrics["per_class_iou"].items()]
        )

    def pictures(self, ev: Evaluator, samples: list[Sample]) -> list[dict]:
        return [
            {
                "key": s.key,
                "image": s.image,
                "truth": s.mask,
                "pred": ev.predict(s, dense),
                "groups": ev.groups(s, dense),
            }
            for s, dense in ev.dense(samples)
        ]

    def legend(self, data: EvalSet) -> tuple[list[str], np.ndarray]:
        names = class_names(data)
        return names, visualize.palette(len(names), background_first=data.has_background)


def _other_mode(mode: str) -> str | None:
    """The background mode the report also shows: threshold beside class prompts and back."""
    return {"class": "threshold", "threshold": "class"}.get(mode)


def _background_split(conf: np.ndarray, has_background: bool) -> dict:
    """The IoU of background (class 0) and the mIoU of the other classes, in percent."""
    if not has_background:
        return {}
    iou = metrics.iou_per_class(conf)
    fg = iou[1:]
    return {
        "background_iou": None if math.isnan(iou[0]) else 100 * float(iou[0]),
        "foreground_miou": 100 * float(np.nanmean(fg)) if np.isfinite(fg).any() else None,
    }


TASK = Segmentation()
