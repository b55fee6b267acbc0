"""Evaluation: metrics (numpy), the evaluator and one file per task (torch), datasets, the Ray
runner, the report and pictures.

    from clippy_ray.eval import run_eval, eval_config, headline, summary_line

Those names load their modules on first use, so importing a submodule (metrics, datasets) does
not import Ray or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from clippy_ray._lazy import lazy_attributes

_HOMES = {"run_eval": "runner", "eval_config": "runner", "headline": "report", "summary_line": "report"}

if TYPE_CHECKING:
    from clippy_ray.eval.report import headline, summary_line
    from clippy_ray.eval.runner import eval_config, run_eval

__getattr__ = lazy_attributes(__name__, _HOMES)

__all__ = ["eval_config", "headline", "run_eval", "summary_line"]
