"""The shape every evaluation task has. A task runs on shards of a dataset split and returns sums
(counts, lists) that add up across shards; the runner hands it the sums of all shards in shard
order, so 1 worker and N workers give identical metrics."""

from __future__ import annotations

import math

import numpy as np

from clippy_ray.eval.datasets import EvalSet, Sample, Shard
from clippy_ray.eval.evaluator import Evaluator


class Task:
    """One evaluation task. Subclasses set `name` (the eval.tasks entry) and the splits it reads,
    and implement run / reduce / headline / summary / report_rows; pictures are optional."""

    name: str = ""
    splits: tuple[str, ...] = ("eval",)  # the dataset splits whose shards it runs on, in this order
    picture_split: str | None = None  # the split whose first shard its picture shows; None: no picture
    picture_shows: tuple[str, ...] = ()  # the tasks whose results its picture shows (any of them draws it)

    def jobs(self, data: EvalSet) -> list[tuple[str, Shard]]:
        """(split, shard) for every shard this task runs on, in order."""
        return [(split, shard) for split in self.splits for shard in data.splits[split]]

    def run(self, ev: Evaluator, samples: list[Sample]) -> dict:
        """One shard's samples -> sums that add up across shards (plain numbers, lists, arrays)."""
        raise NotImplementedError

    def reduce(self, parts: dict[str, list[dict]], data: EvalSet) -> dict:
        """The sums of every shard, per split in shard order -> this task's metrics (JSON-ready)."""
        raise NotImplementedError

    def headline(self, metrics: dict) -> dict[str, float]:
        """The task's headline numbers, flat, with keys prefixed by the task name."""
        raise NotImplementedError

    def summary(self, metrics: dict) -> str:
        """The task's one number for a one-line summary, e.g. "cls top-1 12.3%"."""
        raise NotImplementedError

    def report_rows(self, metrics: dict) -> list[str]:
        """Rows of the report's `| task | metric | value | rows |` table."""
        raise NotImplementedError

    def report_details(self, metrics: dict) -> list[str]:
        """Markdown lines of a section after the table (per-class numbers); none by default."""
        return []

    def pictures(self, ev: Evaluator, samples: list[Sample]) -> list[dict]:
        """Worker side: one item per sample: key, image, pred ([H, W] ids) and optionally truth and
        groups, drawn as tiles by the report."""
        raise NotImplementedError(f"{self.name} draws no pictures")

    def legend(self, data: EvalSet) -> tuple[list[str], np.ndarray]:
        """The names and colours [n, 3] of the ids in `pred` of this task's pictures."""
        raise NotImplementedError(f"{self.name} draws no pictures")


def class_names(data: EvalSet) -> list[str]:
    """One display name per class id (the first synonym)."""
    return [syn[0] for syn in data.class_names]


def fmt(value: float | None) -> str:
    """A report number: two decimals, or n/a for a missing or NaN value."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"
