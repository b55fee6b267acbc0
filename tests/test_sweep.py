"""The ablation sweep: a real 2-trial Ray Tune run (Train V2 + DeepSpeed per trial, then the
parallel evaluation), its table, and resuming it; bad sweep configs fail at once; axes are any
dotted config key or one of the paper's named presets (no Ray needed for those)."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import yaml

from clippy_ray import config
from clippy_ray.tune.config import SweepConfig
from clippy_ray.tune.grid import label, load_sweep, settings, trial_config, trial_overrides
from clippy_ray.tune.sweep import run_sweep
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory, ray_local):
    from clippy_ray.data.benchmark import BenchmarkSpec
    from clippy_ray.data.commands import make_benchmark

    root = tmp_path_factory.mktemp("sweep")
    data = str(root / "data")
    make_benchmark(data, rows=96, eval_rows=16, spec=BenchmarkSpec(seed=5, image_size=32), rows_per_shard=96)
    base = config.to_dict(
        tiny_config(
            f"data.train={data}/train",
            f"data.val={data}/val",
            "data.shuffle_buffer=16",
            "data.decode_batch_size=16",
            "train.num_workers=2",
            "train.cpus_per_worker=0.45",
            "train.global_batch_size=8",
            "train.steps=4",
            "train.warmup_steps=1",
            "train.checkpoint_every=4",
            "train.val_every=2",
            "train.val_batches=1",
            "train.log_every=2",
            "train.zero_stage=2",
            "train.wandb.mode=offline",
            "eval.cpus_per_worker=0.9",
            "eval.rows_per_shard=8",
            "eval.examples=1",
            "eval.templates=simple",
            # each trial's checkpoint evaluated as it lands: a curve per trial
            f"eval.during_training.data={data}",
            "eval.during_training.tasks=[seg]",
            "eval.during_training.max_rows=8",
            "eval.during_training.cpus_per_worker=0.2",
        )
    )
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {
        "name": "two",
        "base": str(root / "base.yaml"),
        "storage": str(root / "sweeps"),
        "axes": {"aggregation": ["max", "avg"]},
        "eval_data": data,
        "scheduler": {"name": "asha", "grace_period": 4},
        "max_concurrent_trials": 1,
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return root


def test_a_two_trial_sweep_fills_the_table_from_real_evaluations_and_resumes(sweep_files, capsys):
    sweep, trials = load_sweep(str(sweep_files / "sweep.yaml"))
    rows = run_sweep(sweep, trials, log=lambda *_: None)
    assert [r["label"] for r in rows] == ["max", "avg"]
    # the console: a line per trial event, not Tune's status table
    console = capsys.readouterr().out
    lines = [ln for ln in console.splitlines() if ln.startswith("[sweep] max")]
    assert lines[0] == "[sweep] max started", console
    assert re.fullmatch(r"\[sweep\] max step 2/4 \| loss \d+\.\d{4}( \| val loss \d+\.\d{3})?", lines[1]), console
    assert re.fullmatch(
        r"\[sweep\] max finished in \d+m\d\ds: cls top-1 [\d.]+ \| seg mIoU [\d.]+ \| unsup Jaccard [\d.]+ "
        r"\| robust gap -?[\d.]+ \| val loss [\d.]+",
        lines[-1],
    ), console
    assert f"seg mIoU {rows[0]['seg_miou']:.1f}" in lines[-1]
    # nothing else (but the raylet's own warnings: this test's Ray is not the CLI's, whose init_ray
    # sends them to the log, see test_console)
    others = [ln for ln in console.splitlines() if ln.strip() and "(raylet)" not in ln]
    assert all(ln.startswith("[sweep] ") for ln in others), console
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
    for trial in ("max", "avg"):  # and has its curve (eval.during_training)
        assert list(json.loads((out / "runs" / trial / "eval" / "curve.json").read_text())) == ["4"]

    # Run it again: Tune restores the experiment and the finished trials are not run again.
    stamps = {r["label"]: (out / "eval" / r["label"] / "results.json").stat().st_mtime_ns for r in rows}
    again = run_sweep(sweep, trials, log=lambda *_: None)
    assert [(r["label"], r["status"], r["seg_miou"]) for r in again] == [
        (r["label"], r["status"], r["seg_miou"]) for r in rows
    ]
    assert {r["label"]: (out / "eval" / r["label"] / "results.json").stat().st_mtime_ns for r in rows} == stamps


def test_a_sweep_naming_an_unknown_axis_value_fails_at_once(tmp_path, capsys):
    from clippy_ray.cli import main

    (tmp_path / "s.yaml").write_text(
        yaml.safe_dump(
            {
                "base": "configs/demo.yaml",
                "axes": {"aggregation": ["max", "mean"], "image_init": ["ssl"], "dropout": [0.1]},
            }
        )
    )
    assert main(["tune", "--config", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert "axes.aggregation: 'mean' is not one of max, avg, cls" in err
    assert "image_inits.ssl: not set" in err
    assert "axes.dropout: unknown axis" in err


def test_a_sweep_whose_local_data_is_missing_fails_before_any_trial(sweep_files, tmp_path, capsys):
    from clippy_ray.cli import main

    (tmp_path / "s.yaml").write_text(
        yaml.safe_dump(
            {
                "base": str(sweep_files / "base.yaml"),
                "storage": str(tmp_path / "sweeps"),
                "axes": {"aggregation": ["max"]},
                "eval_data": str(tmp_path / "no-such-data"),
            }
        )
    )
    assert main(["tune", "--config", str(tmp_path / "s.yaml")]) == 2
    assert f"eval_data: {tmp_path / 'no-such-data'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()


def test_asha_stops_a_trailing_trial_at_a_rung_but_never_on_its_last_step():
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from clippy_ray.tune.config import SchedulerConfig
    from clippy_ray.tune.sweep import _scheduler

    sweep = SweepConfig(
        base="b.yaml",
        axes={"aggregation": ["max", "avg", "cls"]},
        scheduler=SchedulerConfig(name="asha", grace_period=2, reduction_factor=2),
    )
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


# ------------------------------------------------------------------------------- axes (no Ray)

REMOTE_DATA = ["data.train=s3://bucket/train", "data.val=s3://bucket/val"]  # not checked for existence


def _sweep_file(tmp_path, axes: dict, **extra) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump({"base": "configs/demo.yaml", "overrides": REMOTE_DATA, "axes": axes, **extra}, sort_keys=False)
    )
    return str(path)


def test_a_dotted_key_axis_gives_one_trial_per_value_with_that_value(tmp_path):
    sweep, trials = load_sweep(_sweep_file(tmp_path, {"train.lr": [0.001, 0.0005]}))
    assert [t.train.lr for t in trials] == [0.001, 0.0005]
    assert [t.train.run_name for t in trials] == ["lr0.001", "lr0.0005"]
    assert trial_overrides(sweep, settings(sweep)[1]) == ["train.lr=0.0005"]
    # The same axis from the command line: `axes.train.lr=[...]` nests the key; it is the same axis.
    sweep, trials = load_sweep(_sweep_file(tmp_path, {"aggregation": ["max"]}), ["axes.train.lr=[0.01, 0.02]"])
    assert list(sweep.axes) == ["aggregation", "train.lr"] and [t.train.lr for t in trials] == [0.01, 0.02]


def test_points_run_the_listed_rows_instead_of_the_grid(tmp_path):
    axes = {"aggregation": ["max", "avg"], "token_subsampling": ["off", 0.5], "train.lr": [0.001, 0.0005]}
    points = [
        {"token_subsampling": 0.5, "aggregation": "avg", "train": {"lr": 0.001}},  # any key order, nested keys
        {"aggregation": "max", "token_subsampling": "off", "train.lr": 0.0005},
    ]
    sweep, trials = load_sweep(_sweep_file(tmp_path, axes, points=points))
    assert [label(sweep, s) for s in settings(sweep)] == ["avg_sub0.5_lr0.001", "max_sub-off_lr0.0005"]
    assert [(t.model.aggregation, t.model.token_keep_ratio, t.train.lr) for t in trials] == [
        ("avg", 0.5, 0.001),
        ("max", None, 0.0005),
    ]

    # an axis whose values are mappings keeps a point's mapping whole
    kwargs = {"aggregation": ["max"], "model.image.timm_kwargs": [{"depth": 1}, {"depth": 2}]}
    sweep, trials = load_sweep(
        _sweep_file(tmp_path, kwargs, points=[{"aggregation": "max", "model.image.timm_kwargs": {"depth": 2}}])
    )
    assert settings(sweep) == [{"aggregation": "max", "model.image.timm_kwargs": {"depth": 2}}]
    assert trials[0].model.image.timm_kwargs["depth"] == 2

    bad = [
        {"aggregation": "max", "token_subsampling": 0.25, "train.lr": 0.001},
        {"aggregation": "max", "train.lr": 0.001, "model.embed_dim": 64},
        {"aggregation": "max", "token_subsampling": "off", "train.lr": 0.0005},
    ]
    with pytest.raises(config.ConfigError) as err:
        load_sweep(_sweep_file(tmp_path, axes, points=points + bad))
    assert err.value.errors == [
        "points[2].token_subsampling: 0.25 is not one of axes.token_subsampling (off, 0.5)",
        "points[3]: give a value for every axis (aggregation, token_subsampling, train.lr); missing "
        "token_subsampling; not an axis: model.embed_dim",
        "points[4]: the same trial as an earlier point",
    ]


def test_a_preset_and_a_dotted_key_make_the_product_grid(tmp_path):
    sweep, trials = load_sweep(_sweep_file(tmp_path, {"aggregation": ["max", "avg"], "train.lr": [0.001, 0.0005]}))
    assert [label(sweep, s) for s in settings(sweep)] == ["max_lr0.001", "max_lr0.0005", "avg_lr0.001", "avg_lr0.0005"]
    assert [(t.model.aggregation, t.train.lr) for t in trials] == [
        ("max", 0.001),
        ("max", 0.0005),
        ("avg", 0.001),
        ("avg", 0.0005),
    ]


def test_trial_names_stay_unique_and_path_safe_for_any_values(tmp_path):
    sweep, trials = load_sweep(
        _sweep_file(
            tmp_path,
            {
                "model.image.pretrained": [None, "s3://w/dino.pth"],
                "model.text.pretrained": [None],
                "model.text.tokenizer": ["s3://w/a_b", "s3://w/a-b"],
                "model.token_keep_ratio": [None, 0.25],
            },
        )
    )
    names = [label(sweep, s) for s in settings(sweep)]
    assert names[:2] == [
        "image-pretrained-null_text-pretrained-null_tokenizer-s3-w-a-b-1_token-keep-ratio-null",
        "image-pretrained-null_text-pretrained-null_tokenizer-s3-w-a-b-1_token-keep-ratio0.25",
    ]
    assert len(set(names)) == len(names) == 8
    assert all(n.replace("_", "").replace("-", "").replace(".", "").isalnum() for n in names)
    assert {(t.model.image.pretrained, t.model.text.tokenizer) for t in trials} == {
        (image, tok) for image in (None, "s3://w/dino.pth") for tok in ("s3://w/a_b", "s3://w/a-b")
    }


def test_a_sweep_with_an_unknown_dotted_key_or_a_bad_value_fails_with_one_line_naming_each(tmp_path):
    with pytest.raises(config.ConfigError) as err:
        load_sweep(_sweep_file(tmp_path, {"train.lrr": [0.001, 0.0005], "model.aggregation": ["maxx", "avg"]}))
    assert len(err.value.errors) == 2
    assert err.value.errors[0].startswith("axes.train.lrr: unknown key (valid keys: run_name, ")
    assert err.value.errors[1] == "axes.model.aggregation: 'maxx' is not one of max, avg, cls"


def test_an_axis_may_not_vary_a_key_a_preset_or_the_sweep_already_sets(tmp_path):
    with pytest.raises(config.ConfigError) as err:
        load_sweep(
            _sweep_file(
                tmp_path,
                {
                    "token_subsampling": ["off"],
                    "model.token_keep_ratio": [0.5],
                    "train.run_name": ["a"],
                    "aggregation": ["max", "max"],
                },
            )
        )
    assert err.value.errors == [
        "axes.model.token_keep_ratio: model.token_keep_ratio is also set by the token_subsampling preset; "
        "keep one of the two axes",
        "axes.train.run_name: train.run_name is set by the sweep for each trial (its run folder, W&B group); "
        "not an axis",
        "axes.aggregation: 'max' is listed twice",
    ]


def test_the_paper_presets_expand_to_the_overrides_they_stood_for(tmp_path):
    sweep = config.load("configs/ablation.yaml", cls=SweepConfig)
    assert len(settings(sweep)) == 36 and label(sweep, settings(sweep)[0]) == "max_image-ssl_text-sentence_sub-off"
    dino, st5 = sweep.image_inits["ssl"], sweep.text_inits["sentence"]
    expected = {
        ("aggregation", "cls"): ("cls", ["model.aggregation=cls"]),
        ("image_init", "ssl"): ("image-ssl", [f"model.image.pretrained={dino}"]),
        ("image_init", "random"): ("image-random", ["model.image.pretrained=null"]),
        ("text_init", "sentence"): ("text-sentence", [f"model.text.pretrained={st5}", f"model.text.tokenizer={st5}"]),
        # random weights, the same tokenizer: the axis does not also compare vocabularies
        ("text_init", "random"): ("text-random", ["model.text.pretrained=null", f"model.text.tokenizer={st5}"]),
        ("token_subsampling", "off"): ("sub-off", ["model.token_keep_count=null", "model.token_keep_ratio=null"]),
        ("token_subsampling", 0.5): ("sub0.5", ["model.token_keep_count=null", "model.token_keep_ratio=0.5"]),
    }
    for (axis, value), (name, overrides) in expected.items():
        assert (label(sweep, {axis: value}), trial_overrides(sweep, {axis: value})) == (name, overrides)
    # The demo's base keeps half the tokens; the preset's "off" turns sub-sampling off in the resolved config.
    demo = config.load("configs/ablation_demo.yaml", cls=SweepConfig)
    assert [label(demo, s) for s in settings(demo)] == [
        "max_sub-off",
        "max_sub0.5",
        "avg_sub-off",
        "avg_sub0.5",
        "cls_sub-off",
        "cls_sub0.5",
    ]
    assert trial_config(demo, {"token_subsampling": "off"}).model.token_keep_ratio is None
    assert trial_config(demo, {"aggregation": "avg", "token_subsampling": 0.5}).model.aggregation == "avg"


def test_the_results_table_has_a_column_per_axis_dotted_keys_included(tmp_path):
    from clippy_ray.tune.results import markdown_table

    sweep, _ = load_sweep(_sweep_file(tmp_path, {"aggregation": ["max"], "train.lr": [0.001]}))
    rows = [{"setting": s, "label": label(sweep, s), "status": "finished", "seg_miou": 12.5} for s in settings(sweep)]
    head, _, row = markdown_table(sweep, rows).splitlines()
    assert head.startswith("| aggregation | train.lr | cls top-1 (%) | seg mIoU (%) |")
    assert row.startswith("| max | 0.001 | — | 12.5 |")


def test_seed_axes_fold_into_one_line_per_setting_with_every_seeds_value(tmp_path):
    from clippy_ray.tune.results import over_seeds, write_results

    sweep, _ = load_sweep(_sweep_file(tmp_path, {"train.seed": [0, 1], "aggregation": ["max", "avg"]}))
    miou = {("max", 0): 40.0, ("max", 1): 45.0, ("avg", 0): 10.0, ("avg", 1): 12.5}
    rows = [
        {
            "setting": s,
            "label": label(sweep, s),
            "status": "finished" if (s["aggregation"], s["train.seed"]) != ("avg", 1) else "error",
            "seg_miou": miou[s["aggregation"], s["train.seed"]],
            "val_loss": 2.0 + s["train.seed"],
        }
        for s in settings(sweep)
    ]
    head, _, max_row, avg_row = over_seeds(sweep, rows).splitlines()
    assert head.startswith("| aggregation | seeds | cls top-1 (%) | seg mIoU (%) |")
    assert max_row == "| max | 2 of 2 | — | 42.5 (40.0 / 45.0) | — | — | 2.500 (2.000 / 3.000) |"
    assert avg_row.startswith("| avg | 1 of 2 | — | 10.0 (10.0 / —) |")  # an unfinished seed is left out

    sweep.storage = str(tmp_path / "out")
    write_results(sweep, rows)
    md = (tmp_path / "out" / sweep.name / "results.md").read_text()
    assert "## Over seeds (train.seed)" in md and max_row in md
    # a sweep without a seed axis has no such section
    plain, _ = load_sweep(_sweep_file(tmp_path, {"aggregation": ["max"]}))
    assert over_seeds(plain, rows) == ""


def test_paired_differences_over_seeds_match_a_hand_computed_t_test(tmp_path):
    from clippy_ray.tune.results import paired_t, paired_tests, write_results

    # differences 30, 32.5, 30: mean 30.8333, SD sqrt(25/12), t = mean / (SD / sqrt 3) = 37.0;
    # with 2 degrees of freedom the two-sided p is 1 - t / sqrt(t^2 + 2)
    test = paired_t([40.0, 45.0, 50.0], [10.0, 12.5, 20.0])
    assert test["n"] == 3 and test["dof"] == 2
    assert test["mean_diff"] == pytest.approx(92.5 / 3)
    assert test["sd"] == pytest.approx(math.sqrt(25 / 12))
    assert test["t"] == pytest.approx(37.0)
    assert test["p"] == pytest.approx(1 - 37 / math.sqrt(37**2 + 2))
    assert paired_t([1.0], [2.0]) is None  # one pair: no spread to test against
    assert paired_t([1.0, 2.0], [0.0, 1.0])["p"] == 0.0  # the same difference every seed
    with pytest.raises(ValueError, match="pair them seed by seed"):
        paired_t([1.0, 2.0], [1.0])

    sweep, _ = load_sweep(_sweep_file(tmp_path, {"train.seed": [0, 1, 2], "aggregation": ["max", "avg", "cls"]}))
    miou = {"max": [40.0, 45.0, 50.0], "avg": [10.0, 12.5, 20.0], "cls": [10.0, 20.0, 0.0]}
    rows = [
        {
            "setting": s,
            "label": label(sweep, s),
            "status": "error" if (s["aggregation"], s["train.seed"]) == ("cls", 2) else "finished",
            "seg_miou": miou[s["aggregation"]][s["train.seed"]],
        }
        for s in settings(sweep)
    ]
    lines = paired_tests(sweep, rows).splitlines()
    assert lines[0] == "A and B: aggregation."
    assert lines[4] == "| max | avg | seg mIoU (%) | 3 | +30.8 | +30.0 / +32.5 / +30.0 | 1.4 | 37.00 | 0.001 |"
    # cls's seed 2 did not finish: its pairs use seeds 0 and 1 only
    assert "| max | cls | seg mIoU (%) | 2 | +27.5 | +30.0 / +25.0 | 3.5 | 11.00 | 0.058 |" in lines
    assert len(lines) == 4 + 3  # one metric with values, three pairs
    sweep.storage = str(tmp_path / "out")
    write_results(sweep, rows)
    assert "## Paired differences over seeds" in (tmp_path / "out" / sweep.name / "results.md").read_text()
