"""The ablation sweep: a real 2-trial Ray Tune run (Train V2 + DeepSpeed per trial, then the
parallel evaluation), its table, and resuming it; bad sweep configs fail at once."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from clippy_ray import config
from clippy_ray.tune.sweep import load_sweep, run_sweep
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory, ray_local):
    from clippy_ray.data.benchmark import BenchmarkSpec
    from clippy_ray.data.commands import make_benchmark

    root = tmp_path_factory.mktemp("sweep")
    data = str(root / "data")
    make_benchmark(data, rows=96, eval_rows=16, spec=BenchmarkSpec(seed=5, image_size=32), rows_per_shard=96)
    base = config.to_dict(tiny_config(
        f"data.train={data}/train", f"data.val={data}/val", "data.shuffle_buffer=16", "data.decode_batch_size=16",
        "train.num_workers=2", "train.cpus_per_worker=0.45", "train.global_batch_size=8", "train.steps=4",
        "train.warmup_steps=1", "train.checkpoint_every=4", "train.val_every=2", "train.val_batches=1",
        "train.log_every=2", "train.zero_stage=2", "train.wandb.mode=offline",
        "eval.cpus_per_worker=0.9", "eval.rows_per_shard=8", "eval.examples=1", "eval.templates=simple"))
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"name": "two", "base": str(root / "base.yaml"), "storage": str(root / "sweeps"),
             "axes": {"aggregation": ["max", "avg"]}, "eval_data": data,
             "scheduler": {"name": "asha", "grace_period": 4}, "max_concurrent_trials": 1}
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return root


def test_a_two_trial_sweep_fills_the_table_from_real_evaluations_and_resumes(sweep_files):
    sweep, trials = load_sweep(str(sweep_files / "sweep.yaml"))
    rows = run_sweep(sweep, trials, log=lambda *_: None)
    assert [r["label"] for r in rows] == ["max", "avg"]
    for r in rows:
        assert r["status"] == "finished" and r["step"] == 4
        for key in ("cls_top1", "seg_miou", "unsup_jaccard", "robust_gap"):
            assert isinstance(r[key], float)
    out = sweep_files / "sweeps" / "two"
    table = (out / "results.md").read_text()
    assert "| max |" in table and "| avg |" in table and "—" not in table  # both rows filled
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evals = {r["label"]: json.loads((out / "eval" / r["label"] / "results.json").read_text()) for r in rows}
    assert rows[0]["seg_miou"] == pytest.approx(evals["max"]["results"]["seg"]["miou"])
    assert os.listdir(out / "runs" / "max" / "wandb")  # every trial logs to W&B offline

    # Run it again: Tune restores the experiment and the finished trials are not run again.
    stamps = {r["label"]: (out / "eval" / r["label"] / "results.json").stat().st_mtime_ns for r in rows}
    again = run_sweep(sweep, trials, log=lambda *_: None)
    assert [(r["label"], r["status"], r["seg_miou"]) for r in again] == [(r["label"], r["status"], r["seg_miou"]) for r in rows]
    assert {r["label"]: (out / "eval" / r["label"] / "results.json").stat().st_mtime_ns for r in rows} == stamps


def test_a_sweep_naming_an_unknown_axis_value_fails_at_once(tmp_path, capsys):
    from clippy_ray.cli import main

    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "base": "configs/demo.yaml", "axes": {"aggregation": ["max", "mean"], "image_init": ["ssl"],
                                              "dropout": [0.1]}}))
    assert main(["tune", "--config", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert "axes.aggregation: 'mean' is not one of max, avg, cls" in err
    assert "image_inits.ssl: not set" in err
    assert "axes.dropout: unknown axis" in err


def test_a_sweep_whose_local_data_is_missing_fails_before_any_trial(sweep_files, tmp_path, capsys):
    from clippy_ray.cli import main

    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "base": str(sweep_files / "base.yaml"), "storage": str(tmp_path / "sweeps"),
        "axes": {"aggregation": ["max"]}, "eval_data": str(tmp_path / "no-such-data")}))
    assert main(["tune", "--config", str(tmp_path / "s.yaml")]) == 2
    assert f"eval_data: {tmp_path / 'no-such-data'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()


def test_asha_stops_a_trailing_trial_at_a_rung_but_never_on_its_last_step():
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from clippy_ray.config import SchedulerConfig, SweepConfig
    from clippy_ray.tune.sweep import _scheduler

    sweep = SweepConfig(base="b.yaml", axes={"aggregation": ["max", "avg", "cls"]},
                        scheduler=SchedulerConfig(name="asha", grace_period=2, reduction_factor=2))
    asha = _scheduler(sweep, max_steps=8)  # rungs at steps 2, 4 and 8
    good, bad, late = (SimpleNamespace(trial_id=t) for t in ("good", "bad", "late"))
    for t in (good, bad, late):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, good, {"step": 2, "val_loss": 1.0}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, bad, {"step": 2, "val_loss": 5.0}) == TrialScheduler.STOP
    assert asha.on_trial_result(None, good, {"step": 3, "loss": 0.9}) == TrialScheduler.CONTINUE  # no val_loss
    assert asha.on_trial_result(None, good, {"step": 8, "val_loss": 0.5}) == TrialScheduler.CONTINUE
    # Far behind at the last step: it has finished training, so it goes on to its evaluation.
    assert asha.on_trial_result(None, late, {"step": 8, "val_loss": 9.0}) == TrialScheduler.CONTINUE
