import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(*args):
    return subprocess.run([str(BIN / "clippy-ray"), *args], capture_output=True, text=True, timeout=300)


def test_console_script_help_and_version():
    from clippy_ray import __version__

    out = run("--help")
    assert out.returncode == 0 and "version" in out.stdout and "config" in out.stdout
    out = run("version")
    assert out.returncode == 0 and out.stdout.strip() == f"clippy-ray {__version__}"


def test_bad_config_exits_2_with_one_line_and_no_traceback():
    out = run("config", "model.aggregation=maxx")
    assert out.returncode == 2
    assert out.stderr.strip() == "clippy-ray: config error: model.aggregation: 'maxx' is not one of max, avg, cls"


@pytest.mark.integration  # a fresh interpreter importing torch, timm, transformers (and DeepSpeed)
def test_model_command_builds_the_demo_model_and_writes_the_step_0_model(tmp_path):
    import torch

    from clippy_ray import config
    from clippy_ray.model import build_model
    from clippy_ray.model.handoff import load_handoff
    from clippy_ray.tokenizer import build_tokenizer

    out = run("model", "--config", "configs/demo.yaml", "--out", str(tmp_path / "step0"), "train.seed=3")
    assert out.returncode == 0, out.stderr
    assert "64px -> 8x8 feature map, aggregation=max" in out.stdout
    assert f"step-0 model (train.seed=3): {tmp_path / 'step0'}" in out.stdout
    # the weights training with train.seed=3 starts from, as a checkpoint eval reads
    saved, _, _ = load_handoff(str(tmp_path / "step0"))
    cfg = config.load("configs/demo.yaml", ["train.seed=3"])
    torch.manual_seed(3)
    fresh = build_model(cfg.model, build_tokenizer(cfg.model.text).vocab_size)
    expected, got = fresh.state_dict(), saved.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.integration  # a fresh interpreter importing torch, timm, transformers (and DeepSpeed)
def test_cpu_workarounds_make_timm_and_transformers_importable_and_skip_the_shm_build():
    code = (
        "from clippy_ray._compat import patch_torchvision_ops, skip_deepspeed_shm_op\n"
        "import torch\n"
        "patched = patch_torchvision_ops()\n"
        "assert patch_torchvision_ops() is False  # idempotent\n"
        "import timm, torchvision.transforms.v2, transformers.models.t5\n"
        "assert skip_deepspeed_shm_op() is (not torch.cuda.is_available())\n"
        "import importlib\n"
        "assert importlib.import_module('deepspeed.comm.torch').build_shm_op() is None\n"
        "print('patched' if patched else 'native')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    # On a CUDA torch + torchvision the extension loads and the patch is a no-op.
    import torch

    assert out.stdout.strip().splitlines()[-1] == ("native" if torch.cuda.is_available() else "patched")


def test_a_users_mistake_is_one_line_and_a_bug_in_the_library_keeps_its_traceback(monkeypatch, capsys):
    from clippy_ray import cli, config

    assert cli.main(["config", "model.aggregation=maxx"]) == 2
    assert capsys.readouterr().err.strip().startswith("clippy-ray: config error: model.aggregation")

    def broken(*args, **kwargs):
        raise KeyError("an internal bug")

    monkeypatch.setattr(config, "load", broken)
    with pytest.raises(KeyError, match="an internal bug"):  # not swallowed into a one-line "user error"
        cli.main(["config"])


@pytest.mark.integration  # a fresh interpreter building a model
def test_a_model_name_that_is_not_a_vit_is_one_line():
    out = run("model", "model.image.name=resnet18")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clippy-ray: model.image.name='resnet18'"), lines


def test_train_dry_run_prints_the_plan_checks_weights_and_starts_nothing(tmp_path, capsys):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from PIL import Image

    from clippy_ray import cli

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    (tmp_path / "train").mkdir()
    table = pa.table({"image": [png.getvalue()] * 3, "caption": ["a red square"] * 3})
    pq.write_table(table, tmp_path / "train" / "part-0.parquet")
    args = ["train", "--dry-run", f"data.train={tmp_path}/train", f"train.storage={tmp_path}/runs"]
    ray_was_up = ray.is_initialized()  # another test's session Ray may be up already
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert f"data: train {tmp_path}/train (3 rows, 1 file)" in out
    assert f"detected data.train: parquet, 1 file(s) at {tmp_path}/train" in out
    assert "negatives per loss: 64 (the global batch)" in out  # 2 workers x 32, no accumulation
    assert cli.main([*args, "train.grad_accum_steps=4"]) == 0  # loss.negatives=global: features cached
    assert "negatives per loss: 64 (the global batch: each step's micro-batches are embedded first" in (
        capsys.readouterr().out
    )
    assert cli.main([*args, "train.grad_accum_steps=4", "loss.negatives=micro"]) == 0
    assert "negatives per loss: 16 (a micro-batch of 8 x workers, loss.negatives=micro: accumulated micro-batches " in (
        capsys.readouterr().out
    )
    assert f"run folder: {tmp_path}/runs/clippy (new run)" in out and "dry run: nothing was started" in out
    assert ray.is_initialized() == ray_was_up and not (tmp_path / "runs").exists()

    assert cli.main([*args, f"model.image.pretrained={tmp_path}/dino.pth"]) == 2
    err = capsys.readouterr().err.strip()
    expected = f"model.image.pretrained={tmp_path}/dino.pth: no such file or folder; upload the weights there"
    assert err == f"clippy-ray: {expected} or fix the URI"
