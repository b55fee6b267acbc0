"""Zero-shot segmentation: the similarity of each location's dense feature to each class
embedding, bilinearly upsampled to the mask, argmax (with the dataset's background mode). mIoU
from the confusion counts summed over the split, never averaged per shard."""

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
        conf = np.zeros((n, n), np.int64)
        for sample, dense in ev.dense(samples):
            if sample.mask is None:
                raise EvalDataError(f"row {sample.key}: no mask; the seg task needs a mask for every row")
            conf += metrics.confusion(ev.predict(sample, dense), sample.mask, n)
        return {"confusion": conf}

    def reduce(self, parts: dict[str, list[dict]], data: EvalSet) -> dict:
        conf = np.sum([x["confusion"] for x in parts["eval"]], axis=0)
        iou = metrics.iou_per_class(conf)
        return {
            "miou": 100 * metrics.mean_iou(conf),
            "pixel_accuracy": 100 * float(np.trace(conf) / max(conf.sum(), 1)),
            "per_class_iou": {n: (None if math.isnan(v) else 100 * float(v)) for n, v in zip(class_names(data), iou)},
            "pixels": int(conf.sum()),
        }

    def headline(self, metrics: dict) -> dict[str, float]:
        return {"seg_miou": metrics["miou"]}

    def summary(self, metrics: dict) -> str:
        return f"seg mIoU {metrics['miou']:.1f}%"

    def report_rows(self, metrics: dict) -> list[str]:
        return [f"| seg | mIoU (%) | {fmt(metrics['miou'])} | {metrics['pixels']} px |"]

    def report_details(self, metrics: dict) -> list[str]:
        return ["", "## seg: IoU per class (%)", "", "| class | IoU |", "|---|---|"] + [
            f"| {n} | {fmt(v)} |" for n, v in metrics["per_class_iou"].items()
        ]

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


TASK = Segmentation()
