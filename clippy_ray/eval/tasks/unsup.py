"""Unsupervised grouping, no text: PCA of each image's dense map, each location to the nearest
of K components; the groups are matched to the annotated segments (Hungarian) and scored by
Jaccard per segment, averaged over every segment of the split. Its pictures are seg's (they
show the groups)."""

from __future__ import annotations

import math

import numpy as np

from clippy_ray.eval import metrics
from clippy_ray.eval.datasets import EvalDataError, EvalSet, Sample
from clippy_ray.eval.evaluator import Evaluator
from clippy_ray.eval.tasks.base import Task, fmt


class Grouping(Task):
    name = "unsup"

    def run(self, ev: Evaluator, samples: list[Sample]) -> dict:
        ious = []
        for sample, dense in ev.dense(samples):
            segments = sample.instances if sample.instances is not None else sample.mask
            if segments is None:
                raise EvalDataError(f"row {sample.key}: no instance or class mask for the unsup task")
            ious += metrics.matched_jaccard(ev.groups(sample, dense), segments)
        return {"ious": ious}

    def reduce(self, parts: dict[str, list[dict]], data: EvalSet) -> dict:
        ious = [v for x in parts["eval"] for v in x["ious"]]
        return {"jaccard": 100 * float(np.mean(ious)) if ious else math.nan, "segments": len(ious)}

    def headline(self, metrics: dict) -> dict[str, float]:
        return {"unsup_jaccard": metrics["jaccard"]}

    def summary(self, metrics: dict) -> str:
        return f"unsup Jaccard {metrics['jaccard']:.1f}%"

    def report_rows(self, metrics: dict) -> list[str]:
        return [f"| unsup | Jaccard (%) | {fmt(metrics['jaccard'])} | {metrics['segments']} segments |"]


TASK = Grouping()
