"""Every file in configs/ is what a user starts from: each resolves and validates, its evaluation
tasks fit its evaluation data, and a sweep's scheduler can act within its trials' steps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from clippy_ray import config
from clippy_ray.tune.grid import asha_never_stops, load_sweep, scheduler_errors

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# What each kind of evaluation data can serve (see EvalSet.tasks_supported): VOC, ADE20K and COCO
# have masks but no matched/swapped background split; the offline benchmark has everything.
SERVES = {"voc": {"cls", "seg", "unsup"}, "benchmark": {"cls", "seg", "unsup", "robust"}}


def _kind(uri: str) -> str:
    return "voc" if "VOC" in uri else "benchmark"


def _is_sweep(path: Path) -> bool:
    return "axes" in (yaml.safe_load(path.read_text()) or {})


@pytest.fixture
def in_a_checkout_with_data(tmp_path, monkeypatch):
    """A working directory with configs/ and the local data folders the configs name (a fresh
    clone has none: they come from `make demo` / make-benchmark)."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for data in ("runs/demo/data", "runs/bench16k", "runs/grouping/data"):
        for split in ("train", "val"):
            os.makedirs(tmp_path / data / split)
    monkeypatch.chdir(tmp_path)


def test_there_are_training_and_sweep_configs():
    assert any(_is_sweep(p) for p in CONFIGS) and any(not _is_sweep(p) for p in CONFIGS)


@pytest.mark.parametrize("path", [p for p in CONFIGS if not _is_sweep(p)], ids=lambda p: p.name)
def test_each_training_config_resolves_and_its_eval_tasks_fit_its_data(path):
    cfg = config.load(str(path))
    kind = _kind(cfg.data.val or "")
    assert set(cfg.eval.tasks) <= SERVES[kind], (cfg.eval.tasks, kind)


@pytest.mark.parametrize("path", [p for p in CONFIGS if _is_sweep(p)], ids=lambda p: p.name)
def test_each_sweep_resolves_every_trial_its_eval_fits_and_its_scheduler_can_act(path, in_a_checkout_with_data):
    sweep, trials = load_sweep(f"configs/{path.name}")
    assert trials
    if sweep.eval_data:
        assert all(set(t.eval.tasks) <= SERVES[_kind(sweep.eval_data)] for t in trials), sweep.eval_data
    assert scheduler_errors(sweep, trials) == [] and asha_never_stops(sweep, trials) is None


def test_asha_without_validation_during_training_is_refused(in_a_checkout_with_data):
    with pytest.raises(config.ConfigError, match=r"scheduler.metric: val_loss is reported every train.val_every=0"):
        load_sweep("configs/ablation_demo.yaml", ["overrides=[train.val_every=0]", "scheduler.name=asha"])


def test_the_paper_config_asks_for_gpus_in_training_and_evaluation_and_the_default_does_not():
    """Evaluation's devices come from the config, not from the GPUs a cluster happens to have up."""
    paper = config.load(str(ROOT / "configs/vitb16_t5base.yaml"))
    assert paper.train.use_gpu and paper.eval.use_gpu
    assert config.EvalConfig().use_gpu is False
