"""The grid of a sweep: its points, their trial names, the overrides each stands for, and every
trial's resolved training config. Plain data; no Ray.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Any

import yaml

from clippy_ray import config, storage
from clippy_ray.tune.config import PRESETS, SweepConfig, flat_axes


def settings(sweep: SweepConfig) -> list[dict]:
    """The sweep's trials, in a stable order: [{axis: value, ...}, ...] in axis order; its
    `points` when given, else every point of the grid."""
    axes = list(sweep.axes)
    if sweep.points:
        return [{a: flat_axes(p, names=axes)[a] for a in axes} for p in sweep.points]
    return [dict(zip(axes, values)) for values in itertools.product(*(sweep.axes[a] for a in axes))]


def trial_overrides(sweep: SweepConfig, setting: dict) -> list[str]:
    """The config overrides one grid point stands for: a preset's, or `key=value` for a dotted key."""
    out = []
    for axis, value in setting.items():
        out += PRESETS[axis].overrides(sweep, value) if axis in PRESETS else [f"{axis}={_yaml(value)}"]
    return out


def _yaml(value: Any) -> str:
    """The value as an override reads it back (parsed as YAML): None -> null, "off" -> 'off'."""
    return yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip().removesuffix("\n...").strip()


# ------------------------------------------------------------------------------- trial names


def label(sweep: SweepConfig, setting: dict) -> str:
    """A short, unique, path-safe trial name: aggregation=max, token_subsampling=0.5 -> max_sub0.5;
    train.lr=0.001 -> lr0.001. No part holds "_", so different points never share a name."""
    return "_".join(PRESETS[a].label(v) if a in PRESETS else _dotted_label(sweep, a, v) for a, v in setting.items())


def _safe(value: Any) -> str:
    """Letters, digits and . + - only (never "_"): s3://w/dino.pth -> s3-w-dino.pth, None -> null."""
    text = value if isinstance(value, str) else _yaml(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).rstrip("-") or "-"


def _dotted_label(sweep: SweepConfig, axis: str, value: Any) -> str:
    # The key's last part (more parts where two dotted axes end alike), then the value.
    parts, others = axis.split("."), [a.split(".") for a in sweep.axes if a != axis and a not in PRESETS]
    n = next((n for n in range(1, len(parts)) if all(o[-n:] != parts[-n:] for o in others)), len(parts))
    texts, text = [_safe(v) for v in sweep.axes[axis]], _safe(value)
    if len(set(texts)) < len(texts):  # values that differ only in unsafe characters: number them all
        text = f"{text}-{sweep.axes[axis].index(value) + 1}"
    sep = "" if text[0].isdigit() or text[0] in ".+-" else "-"  # lr0.001, but aggregation-max
    return _safe("-".join(parts[-n:])) + sep + text


# ------------------------------------------------------------------------------- trial configs


def trial_config(sweep: SweepConfig, setting: dict) -> config.Config:
    cfg = config.load(
        sweep.base,
        list(sweep.overrides)
        + trial_overrides(sweep, setting)
        + [
            f"train.run_name={label(sweep, setting)}",
            f"train.storage={storage.join(sweep.storage, sweep.name, 'runs')}",
            f"train.wandb.group={sweep.name}",
        ],
    )
    return config.absolute_paths(cfg)


def _axis_errors(sweep: SweepConfig, axis: str) -> list[str]:
    """Each value of one axis on the base config: a bad key or value is named once, by its axis."""
    out = []
    for value in sweep.axes[axis]:
        try:
            trial_config(sweep, {axis: value})
        except config.ConfigError as err:
            out += [
                f"axes.{axis}: {e[len(axis) + 2 :]}" if e.startswith(f"{axis}: ") else f"axes.{axis}={value}: {e}"
                for e in err.errors
            ]
    return list(dict.fromkeys(out))  # an unknown key fails alike for every value


def scheduler_errors(sweep: SweepConfig, trials: list[config.Config]) -> list[str]:
    """ASHA needs its metric before the last step: validation data, and validation during training."""
    s = sweep.scheduler
    if s.name != "asha" or not s.metric.startswith("val_"):
        return []
    steps, t = min(t.train.steps for t in trials), trials[0]
    if not t.data.val:
        return [f"scheduler.metric: {s.metric} needs validation data; set data.val (or use scheduler.name=fifo)"]
    if not 0 < t.train.val_every < steps:
        return [
            f"scheduler.metric: {s.metric} is reported every train.val_every={t.train.val_every} steps "
            f"(0: only at the end) of {steps}; set train.val_every below {steps} so ASHA can compare trials"
        ]
    return []


def asha_never_stops(sweep: SweepConfig, trials: list[config.Config]) -> str | None:
    """Why ASHA could stop no trial (its grace period outlasts the trials), or None."""
    steps = min(t.train.steps for t in trials)
    if sweep.scheduler.name == "asha" and sweep.scheduler.grace_period >= steps:
        return f"scheduler.grace_period {sweep.scheduler.grace_period} >= {steps} steps: ASHA will stop no trial"
    return None


def load_sweep(path: str | None, overrides: list[str] | None = None) -> tuple[SweepConfig, list[config.Config]]:
    """The sweep and every trial's resolved config; any bad field of either fails here, at once."""
    sweep = config.load(path, overrides, cls=SweepConfig)
    if not sweep.base:
        raise config.ConfigError(
            ["base: not set; name the training config every trial starts from (e.g. base: configs/demo.yaml)"]
        )
    sweep.storage, sweep.eval_data = config.absolute_uri(sweep.storage), config.absolute_uri(sweep.eval_data)
    try:
        config.load(sweep.base, list(sweep.overrides))
    except config.ConfigError as err:
        raise config.ConfigError([f"base + overrides: {e}" for e in err.errors]) from None
    errors = [e for axis in sweep.axes for e in _axis_errors(sweep, axis)]
    if errors:
        raise config.ConfigError(errors)
    trials = []
    for setting in settings(sweep):  # the axes together (each alone is valid by now)
        try:
            trials.append(trial_config(sweep, setting))
        except config.ConfigError as err:
            raise config.ConfigError([f"trial {label(sweep, setting)}: {e}" for e in err.errors]) from None
    errors = scheduler_errors(sweep, trials)
    if errors:
        raise config.ConfigError(errors)
    # Local data that is not there would fail every trial, one after the other: say so now.
    missing = [
        (key, uri)
        for key, uri in (
            ("data.train", trials[0].data.train),
            ("data.val", trials[0].data.val),
            ("eval_data", sweep.eval_data),
        )
        if uri and not storage.is_s3(uri) and not os.path.exists(uri)
    ]
    if missing:
        raise config.ConfigError(
            [
                f"{key}: {uri} does not exist; make the data first (`make demo`, or "
                f"`clippy-ray data make-benchmark --out DIR --rows N`) or point {key} at it"
                for key, uri in missing
            ]
        )
    return sweep, trials
