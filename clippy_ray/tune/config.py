"""The sweep file: a base training config, overrides for every trial, and `axes` to grid over.

An axis is any dotted key of the training config with a list of values (`train.lr: [1e-3, 5e-4]`:
each value becomes the override `train.lr=<value>`), or one of the paper's ablation axes, named
presets that each stand for one or two overrides (PRESETS). Whether a dotted key and its values
exist and validate is decided by resolving the trial configs (tune/grid.py), not here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clippy_ray.config import AGGREGATIONS

# ------------------------------------------------------------------------------- presets


def _is_ratio(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1


@dataclass(frozen=True)
class Preset:
    """One of the paper's axes: its values and the overrides a value stands for."""

    values: tuple[str, ...]  # what is valid, as error messages name it
    keys: tuple[str, ...]  # the config keys it sets (a dotted axis may not set them too)
    overrides: Callable[[SweepConfig, Any], list[str]]
    label: Callable[[Any], str]  # the value's part of a trial name, path-safe and without "_"
    accepts: Callable[[Any], bool] | None = None  # None: one of `values`
    inits: str | None = None  # the SweepConfig field giving a URI for each value but random

    def valid(self, v: Any) -> bool:
        return self.accepts(v) if self.accepts else v in self.values


def _image_init(sweep: SweepConfig, v: str) -> list[str]:
    return [f"model.image.pretrained={'null' if v == 'random' else sweep.image_inits[v]}"]


def _text_init(sweep: SweepConfig, v: str) -> list[str]:
    """Both values use the sentence model's tokenizer (its folder holds it), so the axis varies
    the weights alone, not the vocabulary or the caption length the text tower sees."""
    tokenizer = sweep.text_inits.get("sentence")
    if v == "random":
        return ["model.text.pretrained=null"] + ([f"model.text.tokenizer={tokenizer}"] if tokenizer else [])
    uri = sweep.text_inits[v]
    return [f"model.text.pretrained={uri}", f"model.text.tokenizer={uri}"]


def _token_subsampling(sweep: SweepConfig, v: str | float) -> list[str]:
    return ["model.token_keep_count=null", f"model.token_keep_ratio={'null' if v == 'off' else v}"]


def _sub_label(v: str | float) -> str:
    return "sub-off" if v == "off" else f"sub{v}"


def _accepts_subsampling(v: Any) -> bool:
    return v == "off" or _is_ratio(v)


_INIT_KEYS = {"image": ("model.image.pretrained",), "text": ("model.text.pretrained", "model.text.tokenizer")}
_KEEP_KEYS = ("model.token_keep_ratio", "model.token_keep_count")
PRESETS = {
    "aggregation": Preset(AGGREGATIONS, ("model.aggregation",), lambda sweep, v: [f"model.aggregation={v}"], str),
    "image_init": Preset(
        ("ssl", "supervised", "random"), _INIT_KEYS["image"], _image_init, "image-{}".format, inits="image_inits"
    ),
    "text_init": Preset(("sentence", "random"), _INIT_KEYS["text"], _text_init, "text-{}".format, inits="text_inits"),
    "token_subsampling": Preset(
        ("off", "a ratio in (0, 1]"), _KEEP_KEYS, _token_subsampling, _sub_label, accepts=_accepts_subsampling
    ),
}
# Keys every trial gets from the sweep itself (its run folder and W&B group), so no axis may vary them.
SWEEP_KEYS = ("train.run_name", "train.storage", "train.wandb.group")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def _overlaps(a: str, b: str) -> bool:
    """Whether setting dotted key a can change what setting b does (one is the other or inside it)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def flat_axes(axes: dict, prefix: str = "", names: Any = ()) -> dict:
    """{train: {lr: [...]}} -> {train.lr: [...]}: the `axes.train.lr=[...]` override nests the key.
    A key in `names` (the axes, when flattening a point) keeps its value whole, even a mapping."""
    out = {}
    for key, values in axes.items():
        name = f"{prefix}{key}"
        nested = isinstance(values, dict) and name not in names
        out.update(flat_axes(values, f"{name}.", names) if nested else {name: values})
    return out


# ------------------------------------------------------------------------------- the sweep file

SCHEDULERS = ("asha", "fifo")


@dataclass
class SchedulerConfig:
    name: str = "asha"  # asha: stop trials whose metric trails the others at each rung; fifo: run all
    metric: str = "val_loss"
    mode: str = "min"
    grace_period: int = 100  # steps before a trial can be stopped
    reduction_factor: float = 2.0

    def check(self, path: str) -> list[str]:
        errors = []
        if self.name not in SCHEDULERS:
            errors.append(f"{path}.name: {self.name!r} is not one of {', '.join(SCHEDULERS)}")
        if self.mode not in ("min", "max"):
            errors.append(f"{path}.mode: {self.mode!r} is not min or max")
        if self.grace_period < 1 or self.reduction_factor <= 1:
            errors.append(f"{path}: grace_period must be >= 1 and reduction_factor > 1")
        return errors


@dataclass
class SweepConfig:
    """A Ray Tune grid: every trial is `base` + `overrides` + one point of the `axes` grid."""

    name: str = "ablation"  # running again with the same name and storage resumes the sweep
    base: str | None = None  # the training config YAML every trial starts from
    overrides: tuple[str, ...] = ()  # key=value applied to every trial, e.g. train.steps=300
    storage: str = "./runs/sweeps"  # local folder or s3://bucket/prefix
    axes: dict = field(default_factory=dict)  # dotted config key or preset name -> list of values
    # the trials to run, each {axis: value} for every axis, instead of the whole grid (the paper's
    # table is a list of rows, not a grid); empty: every point of the grid
    points: tuple[dict, ...] = ()
    image_inits: dict = field(default_factory=dict)  # ssl / supervised -> checkpoint URI (DINO, supervised ViT)
    text_inits: dict = field(default_factory=dict)  # sentence -> HF folder URI (Sentence-T5, with its tokenizer)
    eval_data: str | None = None  # evaluation data (benchmark root, VOC, ...); none: no evaluation
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_concurrent_trials: int = 1
    trial_cpus: float = 0.1  # the trial's own process; its training workers ask for their own resources

    def __post_init__(self):
        self.axes = flat_axes(self.axes) if isinstance(self.axes, dict) else self.axes

    def check(self, path: str = "") -> list[str]:
        p = f"{path}." if path else ""  # a sweep file's keys are its top level
        errors = self.scheduler.check(f"{p}scheduler")
        if not self.axes:
            errors.append(
                f"{p}axes: empty; give a dotted config key with its values (e.g. train.lr: [0.001, 0.0005]) "
                f"or a preset: {', '.join(PRESETS)}"
            )
        for axis, values in self.axes.items():
            errors += self._check_axis(axis, values, p)
        errors += self._check_points(p)
        if self.max_concurrent_trials < 1:
            errors.append(f"{p}max_concurrent_trials: {self.max_concurrent_trials} must be >= 1")
        if self.trial_cpus <= 0:
            errors.append(f"{p}trial_cpus: {self.trial_cpus} must be > 0 (Ray rejects 0)")
        return errors

    def _check_points(self, p: str) -> list[str]:
        errors = []
        for i, point in enumerate(self.points):
            where = f"{p}points[{i}]"
            if not isinstance(point, dict):
                errors.append(f"{where}: expected {{axis: value, ...}}, got {point!r}")
                continue
            point = flat_axes(point, names=self.axes)
            missing, unknown = [a for a in self.axes if a not in point], [a for a in point if a not in self.axes]
            if missing or unknown:
                errors.append(
                    f"{where}: give a value for every axis ({', '.join(self.axes)})"
                    + (f"; missing {', '.join(missing)}" if missing else "")
                    + (f"; not an axis: {', '.join(unknown)}" if unknown else "")
                )
            errors += [
                f"{where}.{a}: {v!r} is not one of axes.{a} ({', '.join(map(str, self.axes[a]))})"
                for a, v in point.items()
                if a in self.axes and isinstance(self.axes[a], list) and v not in self.axes[a]
            ]
            if point in [flat_axes(q, names=self.axes) for q in self.points[:i] if isinstance(q, dict)]:
                errors.append(f"{where}: the same trial as an earlier point")
        return errors

    def _check_axis(self, axis: str, values: Any, p: str) -> list[str]:
        where, preset = f"{p}axes.{axis}", PRESETS.get(axis)
        if preset is None and not _DOTTED.fullmatch(axis):
            return [
                f"{where}: unknown axis (give a dotted config key such as train.lr, or a preset: {', '.join(PRESETS)})"
            ]
        if not isinstance(values, list) or not values:
            return [f"{where}: expected a non-empty list of values, got {values!r}"]
        errors = [f"{where}: {v!r} is listed twice" for i, v in enumerate(values) if v in values[:i]]
        if preset is None:
            errors += [
                f"{where}: {k} is set by the sweep for each trial (its run folder, W&B group); not an axis"
                for k in SWEEP_KEYS
                if _overlaps(axis, k)
            ]
            errors += [
                f"{where}: {k} is also set by the {name} preset; keep one of the two axes"
                for name in self.axes
                if name in PRESETS
                for k in PRESETS[name].keys
                if _overlaps(axis, k)
            ]
            return errors
        errors += [f"{where}: {v!r} is not one of {', '.join(preset.values)}" for v in values if not preset.valid(v)]
        if preset.inits:
            given = getattr(self, preset.inits)
            errors += [
                f"{p}{preset.inits}.{v}: not set; give the checkpoint URI that {axis}={v} starts from"
                for v in values
                if v != "random" and preset.valid(v) and not given.get(v)
            ]
        return errors
