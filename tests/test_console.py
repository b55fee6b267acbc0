"""The first minutes: precision follows the device, and the console shows one line per event
(or live bars on a TTY) while Ray's own output stays in the run's log folder."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clippy_ray import precision
from clippy_ray.console import Console, render

ROOT = Path(__file__).resolve().parents[1]
NO_BF16 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_cpu_flags_are_read_from_cpuinfo():
    assert precision.cpu_bf16_flags(NO_BF16) == []
    assert precision.cpu_bf16_flags(BF16) == ["avx512_bf16", "amx_bf16"]


def test_explicit_precision_wins_and_auto_is_fp32_on_a_cpu_without_native_bf16():
    cpu = torch.device("cpu")
    assert precision.choose("bf16", cpu, NO_BF16) == precision.Choice("bf16", "set in the config")
    choice = precision.choose("auto", cpu, NO_BF16)
    assert choice.precision == "fp32" and choice.dtype == torch.float32
    assert "no native bf16" in choice.reason
    assert precision.matmul_dtype("auto", "fp32") == torch.float32
    assert precision.matmul_dtype("bfloat16", "fp32") == torch.bfloat16


def test_auto_on_a_gpu_picks_bf16_only_where_it_runs_natively_not_on_v100_or_t4():
    # torch.cuda.is_bf16_supported() is True on a V100 (7.0) and a T4 (7.5): bf16 emulated there
    assert precision.cuda_choice("Tesla V100-SXM2-32GB", (7, 0)).precision == "fp32"
    t4 = precision.cuda_choice("Tesla T4", (7, 5))
    assert t4.precision == "fp32" and "no native bf16 (needs 8.0 or later)" in t4.reason
    assert precision.cuda_choice("NVIDIA A100-SXM4-80GB", (8, 0)).precision == "bf16"
    assert precision.cuda_choice("NVIDIA H100 80GB HBM3", (9, 0)).precision == "bf16"


@pytest.mark.integration  # a fresh interpreter, so oneDNN and MKL read the ISA cap at start
@pytest.mark.skipif(not precision.cpu_bf16_flags(), reason="needs a CPU that announces native bf16")
def test_auto_measures_and_picks_fp32_when_the_math_library_cannot_use_native_bf16():
    """The CPU announces avx512_bf16, but with oneDNN and MKL capped at AVX2 (as on an AVX2-only
    box) a bf16 matmul is emulated and ~30x slower: `auto` must see that and choose fp32."""
    code = (
        "import torch; from clippy_ray import precision as p\n"
        "c = p.choose('auto', torch.device('cpu')); print(c.precision); print(c.reason)\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    chosen, reason = out.stdout.strip().splitlines()[-2:]
    assert chosen == "fp32" and reason.startswith("bf16 is slower here"), reason


def _events():
    yield {"kind": "start", "text": "run demo: 10 steps", "step": 0, "total": 10}
    for step in (2, 4):
        yield {"kind": "step", "text": f"step {step}/10 | loss 2.0", "step": step, "total": 10, "status": "loss 2.0"}
    yield {"kind": "val", "text": "step 4/10 validation: loss 1.9", "step": 4, "total": 10}
    yield {"kind": "done", "text": "training done in 0m05s", "step": 10, "total": 10}


def test_without_a_tty_every_event_is_one_plain_line():
    out = io.StringIO()
    console = Console(out, tty=False)
    for event in _events():
        render(console, event)
    assert out.getvalue().splitlines() == [
        "[clippy-ray] run demo: 10 steps",
        "[clippy-ray] step 2/10 | loss 2.0",
        "[clippy-ray] step 4/10 | loss 2.0",
        "[clippy-ray] step 4/10 validation: loss 1.9",
        "[clippy-ray] training done in 0m05s",
    ]


def test_on_a_tty_steps_move_one_bar_and_other_events_print_above_it():
    out = io.StringIO()
    console = Console(out, tty=True)
    for event in _events():
        render(console, event)
    text = out.getvalue()
    assert "train 4/10" in text and "loss 2.0" in text  # the bar, with its status
    assert "[clippy-ray] step 2/10 | loss 2.0" not in text  # steps are the bar, not lines
    assert "[clippy-ray] step 4/10 validation: loss 1.9" in text and "[clippy-ray] training done" in text


@pytest.mark.integration  # a whole `clippy-ray demo` in a subprocess: its own local Ray, DeepSpeed, eval
def test_demo_console_without_a_tty_is_a_short_clean_story_and_rays_logs_are_in_the_run_folder(tmp_path):
    args = [
        "demo",
        "--config",
        "configs/demo.yaml",
        "--rows",
        "128",
        f"data.train={tmp_path}/data/train",
        f"data.val={tmp_path}/data/val",
        f"train.storage={tmp_path}/runs",
        "train.steps=4",
        "train.warmup_steps=1",
        "train.log_every=2",
        "train.val_every=2",
        "train.val_batches=1",
        "train.checkpoint_every=4",
        "train.wandb.mode=disabled",
        "eval.max_rows=32",
    ]
    out = subprocess.run(
        [str(Path(sys.executable).parent / "clippy-ray"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert len(lines) <= 40, "\n".join(lines)
    assert not re.search(r"\x1b\[", out.stdout + out.stderr)  # no colour codes, no bar redraws
    assert not any("pid=" in ln or "Token authentication" in ln or "Reporting training result" in ln for ln in lines)
    assert len(set(lines)) == len(lines), "a line was printed twice"
    assert all(ln.startswith("[clippy-ray] ") for ln in lines), [ln for ln in lines if not ln.startswith("[")]
    text = "\n".join(lines)
    for expected in (
        "data: train",
        "workers: 2 x",
        "precision ",
        "step 2/4 |",
        "step 4/4 validation",
        "evaluation:",
        "handoff model:",
        "logs (this command's and Ray's):",
    ):
        assert expected in text, expected
    logs = tmp_path / "runs" / "demo" / "logs"
    assert "Started a local Ray instance" in (logs / "clippy-ray.log").read_text()
    assert any(p.name.startswith("worker-") for p in (logs / "ray").iterdir())  # the workers' own output


def test_what_the_raylet_pushes_to_the_driver_goes_to_the_log_not_the_console(monkeypatch, capsys):
    import logging

    import ray._private.worker as ray_worker

    from clippy_ray.ray_init import driver_messages_to_log

    # Ray's own function, whatever an earlier init_ray in this process did (restored after)
    original = getattr(ray_worker.print_to_stdstream, "clippy_ray_original", ray_worker.print_to_stdstream)
    monkeypatch.setattr(ray_worker, "print_to_stdstream", original)
    monkeypatch.setattr(logging.getLogger("ray"), "level", logging.INFO)
    monkeypatch.setattr(logging.getLogger("ray"), "disabled", False)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    monkeypatch.setattr(logging.getLogger("ray"), "handlers", [handler])  # as init_ray leaves it: no console
    warning = "\x1b[33mWARNING: 8 PYTHON worker processes have been started on node: 4a5b\x1b[0m"
    monkeypatch.setattr(logging.getLogger("ray"), "propagate", False)
    driver_messages_to_log()
    driver_messages_to_log()  # twice is once
    ray_worker.print_to_stdstream({"lines": [warning], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr()
    assert out.out == out.err == ""
    assert [r.getMessage() for r in records] == [
        "(raylet) WARNING: 8 PYTHON worker processes have been started on node: 4a5b"
    ]
    driver_messages_to_log(False)  # --verbose: Ray prints again
    ray_worker.print_to_stdstream({"lines": ["shown"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert "shown" in capsys.readouterr().out and len(records) == 1


def test_events_reach_the_driver_console_and_a_lost_queue_never_fails_the_worker(ray_local, capsys):
    import ray

    from clippy_ray.console import PREFIX, EventQueue, emitter

    out = io.StringIO()
    with EventQueue(Console(out, tty=False)) as events:
        send = emitter(events.queue)
        send({"kind": "start", "text": "run x: 2 steps"})
    assert out.getvalue().splitlines() == ["[clippy-ray] run x: 2 steps"]
    deadline = time.time() + 120  # ray.kill only asks: wait until the actor is really gone
    while True:
        try:
            ray.get(events.queue.actor.qsize.remote())
        except ray.exceptions.RayActorError:
            break
        assert time.time() < deadline, "the event queue actor is still alive 120 s after ray.kill"
        time.sleep(0.1)
    capsys.readouterr()
    # the queue is gone (as when its node is lost): the worker's event goes to its own log, no error
    send({"kind": "step", "text": "step 1/2 | loss 2.0", "step": 1, "total": 2})
    assert capsys.readouterr().out == f"{PREFIX} step 1/2 | loss 2.0\n"
    assert out.getvalue().splitlines() == ["[clippy-ray] run x: 2 steps"]


def test_ray_datas_own_console_lines_stay_in_its_log_file(monkeypatch, capsys):
    import logging

    from ray._private.log import PlainRayHandler

    from clippy_ray.ray_init import _ray_data_console_off

    logger = logging.getLogger("ray.data")
    records: list[logging.LogRecord] = []
    kept = logging.Handler()  # stands for its file handler (ray-data.log)
    kept.emit = records.append
    # as `import ray.data` leaves the logger, whatever an earlier init_ray in this process did (restored after)
    monkeypatch.setattr(logger, "handlers", [kept, PlainRayHandler()])
    monkeypatch.setattr(logger, "level", logging.DEBUG)
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(logger, "disabled", False)
    executor = logging.getLogger("ray.data._internal.execution.streaming_executor")
    executor.info("Starting execution of Dataset d_0")
    assert "Starting execution of Dataset d_0" in capsys.readouterr().err  # as Ray Data ships it
    _ray_data_console_off()
    executor.info("Starting execution of Dataset d_1")
    assert capsys.readouterr().err == ""
    assert [r.getMessage() for r in records] == [f"Starting execution of Dataset d_{i}" for i in (0, 1)]
