"""Zero-shot classification (CLIP's protocol): each center-cropped image against the
prompt-averaged embeddings of the foreground classes. A row hits at k when any of its labels is
among the k best classes; accuracy = hits / rows over the whole split."""

from __future__ import annotations

from clippy_ray.eval import metrics
from clippy_ray.eval.datasets import EvalSet, Sample
from clippy_ray.eval.evaluator import Evaluator
from clippy_ray.eval.tasks.base import Task, fmt


class Classification(Task):
    name = "cls"

    def run(self, ev: Evaluator, samples: list[Sample]) -> dict:
        logits = ev.fg_logits(samples)  # [N, F]
        labels = [[ev.fg_ids.index(label) for label in s.labels if label in ev.fg_ids] for s in samples]
        hits = metrics.topk_hits(logits, labels, (1, 5))
        return {"hits1": hits[1], "hits5": hits[5], "rows": len(samples)}

    def reduce(self, parts: dict[str, list[dict]], data: EvalSet) -> dict:
        p = parts["eval"]
        rows = sum(x["rows"] for x in p)
        return {
            "top1": 100 * sum(x["hits1"] for x in p) / max(rows, 1),
            "top5": 100 * sum(x["hits5"] for x in p) / max(rows, 1),
            "rows": rows,
        }

    def headline(self, metrics: dict) -> dict[str, float]:
        return {"cls_top1": metrics["top1"], "cls_top5": metrics["top5"]}

    def summary(self, metrics: dict) -> str:
        return f"cls top-1 {metrics['top1']:.1f}%"

    def report_rows(self, metrics: dict) -> list[str]:
        return [
            f"| cls | top-1 accuracy (%) | {fmt(metrics['top1'])} | {metrics['rows']} |",
            f"| cls | top-5 accuracy (%) | {fmt(metrics['top5'])} | {metrics['rows']} |",
        ]


TASK = Classification()
