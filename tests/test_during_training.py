"""Every checkpoint evaluated as it lands, beside training (`eval.during_training`: Ray Train's
validation tasks), and `clippy-ray eval --watch` following a run: real Ray, DeepSpeed, the moto S3
server."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from clippy_ray import storage
from clippy_ray.errors import InputError
from tests.test_train import train_cfg

pytestmark = pytest.mark.integration


def during(data: Path, *extra: str) -> list[str]:
    return [
        f"eval.during_training.data={data}",
        "eval.during_training.tasks=[seg, unsup]",
        "eval.during_training.max_rows=16",
        "eval.during_training.cpus_per_worker=0.25",
        "eval.examples=2",
        *extra,
    ]


def wandb_records(path: Path):
    """The records of a W&B run file (`run-*.wandb`, offline): W&B's 7-byte header, then LevelDB's
    log format (32 KiB blocks; each record a 7-byte header: checksum, length, type) of protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last part of one
            record = pb.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def logged_eval_steps(run: Path) -> list[int]:
    """The `eval/step` values the run's offline W&B files hold, over every file of the run."""
    steps = []
    for path in run.glob("wandb/offline-run-*/run-*.wandb"):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                items = {"/".join(item.nested_key) or item.key: item.value_json for item in record.history.item}
                if "eval/step" in items:
                    steps.append(int(float(items["eval/step"])))
    return sorted(steps)


def _eval_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any("EvalWorker" in part for part in proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_each_checkpoint_is_evaluated_as_it_lands_a_killed_evaluation_is_tried_again_and_a_resume_adds_only_new(
    ray_local,
    bench,
    tmp_path,  # noqa: F811
):
    from clippy_ray.train.trainer import fit

    common = ("train.checkpoint_every=2", "train.log_every=2", "train.wandb.mode=offline", *during(bench))
    # keep one checkpoint: the others must stay until their evaluation has read them
    cfg = train_cfg(bench, str(tmp_path), "curve", "train.steps=6", "train.keep_checkpoints=1", *common)
    killed: list[int] = []

    def kill_the_first_evaluation():  # mid-evaluation: its actor, once
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            for proc in _eval_workers():
                proc.send_signal(signal.SIGKILL)
                killed.append(proc.pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_first_evaluation, daemon=True)
    killer.start()
    result = fit(cfg)
    killer.join(timeout=1)
    assert result.metrics["step"] == 6 and killed
    out = tmp_path / "curve" / "eval"
    curve = json.loads((out / "curve.json").read_text())
    assert sorted(curve) == ["2", "4", "6"]
    assert all(set(numbers) == {"seg_miou", "unsup_jaccard"} for numbers in curve.values())
    table = (out / "curve.md").read_text()
    assert "| step | seg_miou | unsup_jaccard |" in table and table.count("\n| ") == 4  # header + 3 steps
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for step in (2, 4, 6):
        assert (out / f"step_{step:08d}" / "results.md").exists()
    attempts = {
        step: json.loads((out / f"step_{step:08d}" / "attempts.json").read_text())["attempts"] for step in (2, 4, 6)
    }
    retried = [step for step, a in attempts.items() if len(a) > 1]
    assert len(retried) == 1, attempts  # the killed one, tried again
    first, second = attempts[retried[0]]
    assert "Actor" in first["result"] and second["result"] == "done", attempts
    assert all(a[-1]["result"] == "done" for a in attempts.values())
    assert logged_eval_steps(tmp_path / "curve") == [2, 4, 6]  # in the run's W&B, each once
    # the run goes on: only the new checkpoint is evaluated, the others' results are left as they are
    before = {p: p.stat().st_mtime_ns for p in out.glob("step_*/results.json")}
    fit(train_cfg(bench, str(tmp_path), "curve", "train.steps=8", "train.keep_checkpoints=1", *common))
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert sorted(json.loads((out / "curve.json").read_text())) == ["2", "4", "6", "8"]
    assert logged_eval_steps(tmp_path / "curve") == [2, 4, 6, 8]


def test_evaluation_data_that_cannot_serve_the_tasks_is_one_line_before_ray_starts(bench, tmp_path):
    from clippy_ray.train.trainer import check_eval_during_training

    cfg = train_cfg(bench, str(tmp_path), "x", *during(bench, "eval.during_training.tasks=[seg, robust]"))
    with pytest.raises(InputError) as err:
        check_eval_during_training(cfg)
    assert str(err.value).startswith(f"eval.during_training.tasks: {bench} cannot serve robust (")
    assert str(err.value).endswith("name only tasks it supports: cls, seg, unsup")


def test_an_s3_run_is_evaluated_as_it_trains_and_eval_watch_follows_it_to_its_last_checkpoint(
    ray_local,
    bench,
    bucket,  # noqa: F811
):
    from clippy_ray.train.trainer import fit

    runs = f"s3://{bucket}/runs"
    cfg = train_cfg(
        bench, runs, "watched", "train.steps=6", "train.checkpoint_every=2", "train.log_every=2", *during(bench)
    )
    result: dict = {}
    trainer = threading.Thread(target=lambda: result.update(r=fit(cfg)), daemon=True)
    trainer.start()
    deadline = time.time() + 300
    while not storage.exists(f"{runs}/watched/config.yaml"):
        assert time.time() < deadline and trainer.is_alive()
        time.sleep(0.2)
    # a separate job, started while the run trains: the session's Ray is its cluster
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    watcher = subprocess.run(
        [
            str(Path(sys.executable).parent / "clippy-ray"), "eval", "--watch", f"{runs}/watched", "--data", str(bench),
            "--tasks", "cls", "--max-rows", "16", "--workers", "1", "--poll", "1",
            "--out", f"s3://{bucket}/watch-out", "eval.cpus_per_worker=0.25",
        ],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    trainer.join(timeout=600)
    assert result["r"].metrics["step"] == 6
    assert watcher.returncode == 0, watcher.stderr[-3000:]
    assert "step 6/6 evaluation: cls top-1" in watcher.stdout, watcher.stdout
    assert f"watched {runs}/watched to step 6: 3 checkpoints evaluated" in watcher.stdout
    watched = json.loads(storage.read_bytes(f"s3://{bucket}/watch-out/curve.json"))
    assert sorted(watched) == ["2", "4", "6"] and set(watched["6"]) == {"cls_top1", "cls_top5"}
    during_training = json.loads(storage.read_bytes(f"{runs}/watched/eval/curve.json"))
    assert sorted(during_training) == ["2", "4", "6"]
    assert storage.exists(f"{runs}/watched/eval/step_00000006/results.md")
