"""The evaluation tasks, one file each (cls, seg, unsup, robust), by eval.tasks name. Every task
has the shape of `base.Task`: its shards' work, the reduction of their sums into metrics, its
headline numbers, its rows of the report and its pictures, if any."""

from __future__ import annotations

from clippy_ray.eval.tasks import cls, robust, seg, unsup
from clippy_ray.eval.tasks.base import Task

TASKS: dict[str, Task] = {t.name: t for t in (cls.TASK, seg.TASK, unsup.TASK, robust.TASK)}  # report order


def ordered(names: list[str] | tuple[str, ...] | dict) -> list[Task]:
    """The named tasks in report order (the order of TASKS), whatever order they were given in."""
    return [task for name, task in TASKS.items() if name in names]


__all__ = ["TASKS", "Task", "ordered"]
