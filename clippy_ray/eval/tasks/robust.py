"""Robustness to backgrounds (the paper's Waterbirds number): zero-shot top-1 accuracy on images
whose background matches their class vs swapped backgrounds, per class group and overall; the
gap = matched - swapped in accuracy points. Its picture labels every location with the best of
the classes and the background (context) names."""

from __future__ import annotations

import numpy as np
import torch

from clippy_ray.eval import metrics, visualize
from clippy_ray.eval.datasets import EvalSet, Sample
from clippy_ray.eval.evaluator import Evaluator, foreground_ids, score_maps
from clippy_ray.eval.tasks.base import Task, class_names, fmt


class Robustness(Task):
    name = "robust"
    splits = ("matched", "swapped")
    picture_split = "swapped"
    picture_shows = ("robust",)

    def run(self, ev: Evaluator, samples: list[Sample]) -> dict:
        logits = ev.fg_logits(samples)  # [N, F]
        top1 = np.asarray(ev.fg_ids)[logits.argmax(1)] if len(logits) else np.zeros(0, int)
        first = [s.labels[0] if s.labels else -1 for s in samples]
        return {"correct": [int(p == label) for p, label in zip(top1.tolist(), first)], "labels": first}

    def reduce(self, parts: dict[str, list[dict]], data: EvalSet) -> dict:
        names = class_names(data)
        ids = foreground_ids(data)
        column = {c: i for i, c in enumerate(ids)}

        def cat(key: str, split: str) -> np.ndarray:
            return np.asarray([v for x in parts.get(split, []) for v in x[key]])

        matched = np.asarray([column.get(int(v), -1) for v in cat("labels", "matched")])
        swapped = np.asarray([column.get(int(v), -1) for v in cat("labels", "swapped")])
        out = metrics.domain_gap(
            cat("correct", "matched"), matched, cat("correct", "swapped"), swapped, [names[i] for i in ids]
        )
        out["rows"] = {"matched": int(len(matched)), "swapped": int(len(swapped))}
        return out

    def headline(self, metrics: dict) -> dict[str, float]:
        return {
            "robust_gap": metrics["gap"],
            "robust_matched": metrics["matched"],
            "robust_swapped": metrics["swapped"],
        }

    def summary(self, metrics: dict) -> str:
        return f"robust gap {metrics['gap']:.1f} pts"

    def report_rows(self, metrics: dict) -> list[str]:
        rows = f"{metrics['rows']['matched']} + {metrics['rows']['swapped']}"
        return [
            f"| robust | matched accuracy (%) | {fmt(metrics['matched'])} | {rows} |",
            f"| robust | swapped accuracy (%) | {fmt(metrics['swapped'])} | {rows} |",
            f"| robust | domain gap (points) | {fmt(metrics['gap'])} | {rows} |",
        ]

    def report_details(self, metrics: dict) -> list[str]:
        return [
            "",
            "## robust: accuracy per class group (%)",
            "",
            "| class | matched | swapped | gap |",
            "|---|---|---|---|",
        ] + [
            f"| {n} | {fmt(v['matched'])} | {fmt(v['swapped'])} | {fmt(v['gap'])} |"
            for n, v in metrics["per_class"].items()
        ]

    def pictures(self, ev: Evaluator, samples: list[Sample]) -> list[dict]:
        # Per-location argmax over the classes and the context names (the paper's Figure 4a):
        # ids 0..F-1 = foreground classes, F.. = contexts.
        classifier = torch.cat([ev.fg, ev.context])
        return [
            {
                "key": s.key,
                "image": s.image,
                "pred": score_maps(dense, classifier, tuple(s.image.shape[:2])).argmax(0).cpu().numpy(),
            }
            for s, dense in ev.dense(samples)
        ]

    def legend(self, data: EvalSet) -> tuple[list[str], np.ndarray]:
        names = class_names(data)
        names = [names[i] for i in foreground_ids(data)] + [syn[0] for syn in data.context_names]
        return names, visualize.palette(len(names))


TASK = Robustness()
