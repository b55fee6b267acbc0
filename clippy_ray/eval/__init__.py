"""Evaluation: metrics (numpy), the evaluator and one file per task (torch), datasets, the Ray
runner, the report and pictures.

    from clippy_ray.eval import run_eval, eval_config, headline, summary_line

Those names load their modules on first use, so importing a submodule (metrics, datasets) does
not import Ray or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {"run_eval": "runner", "eval_config": "runner", "headline": "report", "summary_line": "report"}

if TYPE_CHECKING:
    from clippy_ray.eval.report import headline, summary_line
    from clippy_ray.eval.runner import eval_config, run_eval


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"clippy_ray.eval.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["eval_config", "headline", "run_eval", "summary_line"]
