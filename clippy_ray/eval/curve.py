"""Each checkpoint of a run evaluated as it lands, and the run's curve: every headline number
against the step.

`CheckpointEvaluator` is what Ray Train runs as a validation task on each checkpoint a run
registers (`eval.during_training`, wired in `clippy_ray.train.trainer`), beside training: the
same evaluator `clippy-ray eval` uses, on its own Ray actors. `watch` does the same from a
separate job that follows a run (`clippy-ray eval --watch`). Either writes, under the run's
`eval/` folder (or another):

    step_XXXXXXXX/results.json, results.md, pictures   one evaluation, as `clippy-ray eval` writes it
    curve.json, curve.md, curve.png                      every evaluated step, rewritten as each lands

Each evaluation keeps `step_XXXXXXXX/attempts.json` (when each attempt started and how it ended:
the reason of a failure, or done); one that has results is never run again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable

from clippy_ray import storage
from clippy_ray.config import Config, EvalConfig
from clippy_ray.eval import report
from clippy_ray.eval.datasets import EvalSet
from clippy_ray.eval.tasks import ordered
from clippy_ray.model.handoff import HANDOFF_DIR

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")  # a checkpoint folder's name
ATTEMPTS_FILE = "attempts.json"
ATTEMPTS = 2  # a failed or killed evaluation is tried once more


def step_of(checkpoint: str) -> int:
    """The step of a checkpoint folder `.../step_XXXXXXXX`."""
    match = STEP_DIR.match(checkpoint.rstrip("/").rsplit("/", 1)[-1])
    if not match:
        raise ValueError(f"{checkpoint}: not a training checkpoint folder (step_XXXXXXXX)")
    return int(match.group(1))


def evaluated(out: str) -> dict[int, dict]:
    """{step: headline numbers} of every evaluation under `out` (a run's eval folder)."""
    found: dict[int, dict] = {}
    if not storage.exists(out):
        return found
    for path in storage.list_files(out):
        parts = path.rstrip("/").split("/")
        if parts[-1] == "results.json" and len(parts) > 1 and (match := STEP_DIR.match(parts[-2])):
            results = json.loads(storage.read_bytes(path))["results"]
            found[int(match.group(1))] = report.headline(results)
    return dict(sorted(found.items()))


def write_curve(out: str) -> dict[int, dict]:
    """curve.json, curve.md and curve.png under `out` from every evaluation there; returns them."""
    points = evaluated(out)
    names = sorted({k for numbers in points.values() for k in numbers})
    lines = ["# evaluation during training", "", "| step | " + " | ".join(names) + " |"]
    lines.append("|---|" + "---|" * len(names))
    for step, numbers in points.items():
        lines.append(f"| {step} | " + " | ".join(_number(numbers.get(n)) for n in names) + " |")
    lines += ["", "Each number is the evaluation of that step's checkpoint (`step_XXXXXXXX/results.md`).", ""]
    storage.write_bytes(storage.join(out, "curve.md"), "\n".join(lines).encode())
    storage.write_bytes(storage.join(out, "curve.json"), json.dumps({str(k): v for k, v in points.items()}).encode())
    storage.write_bytes(storage.join(out, "curve.png"), _plot(points, names))
    return points


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _plot(points: dict[int, dict], names: list[str]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4 * max(len(names), 1), 3.2), squeeze=False)
    steps = list(points)
    for ax, name in zip(axes[0], names):
        ax.plot(steps, [points[s].get(name, float("nan")) for s in steps], marker="o")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def evaluate(
    checkpoint: str,
    data: str | EvalSet,
    cfg: EvalConfig,
    out: str,
    data_format: str = "auto",
    emit: Callable[[str], None] = print,
    total: int | None = None,
) -> dict:
    """Evaluate one training checkpoint (its handoff) into `out/step_XXXXXXXX/` and rewrite the
    curve; returns its headline numbers. One that has results already is not evaluated again. Each
    attempt is recorded (`attempts.json`); a failure is also said in one line and raised again, for
    a retry."""
    from clippy_ray.eval.runner import run_eval

    step = step_of(checkpoint)
    folder = storage.join(out, f"step_{step:08d}")
    if storage.exists(storage.join(folder, "results.json")):
        return evaluated(out).get(step, {})
    where = f"step {step}" + (f"/{total}" if total else "")
    attempts = _attempts(folder)
    if attempts and attempts[-1]["result"] == "started":  # the attempt before died with its process
        attempts[-1]["result"] = "its process stopped (killed, or its node was lost)"
        emit(f"{where} evaluation: trying again ({attempts[-1]['result']})")
    attempts.append({"attempt": len(attempts) + 1, "started": time.time(), "result": "started"})
    _write_attempts(folder, attempts)
    try:
        evaluation = run_eval(
            storage.join(checkpoint, HANDOFF_DIR), data, cfg, folder, fmt=data_format, log=logger.info
        )
    except Exception as err:
        attempts[-1]["result"] = f"{type(err).__name__}: {err}".splitlines()[0][:500]
        _write_attempts(folder, attempts)
        again = "; trying again" if failed(attempts) < ATTEMPTS else "; training goes on without it"
        emit(f"{where} evaluation failed (attempt {len(attempts)}): {attempts[-1]['result']}{again}")
        raise
    attempts[-1]["result"] = "done"
    _write_attempts(folder, attempts)
    write_curve(out)
    numbers = report.headline(evaluation["results"])
    summary = ", ".join(task.summary(evaluation["results"][task.name]) for task in ordered(evaluation["results"]))
    seconds = time.time() - attempts[-1]["started"]
    emit(f"{where} evaluation: {summary} ({seconds:.0f} s; {out}/curve.md)")
    return numbers


def failed(attempts: list[dict]) -> int:
    return sum(a["result"] not in ("done", "started") for a in attempts)


def _attempts(folder: str) -> list[dict]:
    path = storage.join(folder, ATTEMPTS_FILE)
    return json.loads(storage.read_bytes(path))["attempts"] if storage.exists(path) else []


def _write_attempts(folder: str, attempts: list[dict]) -> None:
    storage.write_bytes(storage.join(folder, ATTEMPTS_FILE), json.dumps({"attempts": attempts}, indent=1).encode())


def checkpoint_uri(checkpoint) -> str:
    """The URI of a Ray Checkpoint: Ray reports an S3 one as bucket/prefix."""
    import pyarrow.fs as pafs

    return f"s3://{checkpoint.path}" if isinstance(checkpoint.filesystem, pafs.S3FileSystem) else checkpoint.path


class CheckpointEvaluator:
    """Ray Train's validation function (`ray.train.ValidationConfig`): evaluates each checkpoint a
    run registers into `<run>/eval/` with `eval.during_training`'s settings, sends one line per
    finished (or failed) evaluation to the driver's console, and logs to the run's W&B run the
    evaluations that land after training closed it. Returns the headline numbers, which Ray keeps
    with the checkpoint's metrics. `cfg`: the run's config (local paths absolute)."""

    def __init__(self, cfg: Config, events=None):
        self.cfg, self.events = cfg, events

    def __call__(self, checkpoint, **_) -> dict:
        from clippy_ray import tracking
        from clippy_ray.console import emitter

        cfg, during = self.cfg, self.cfg.eval.during_training
        send = emitter(self.events)
        emit = lambda text: send({"kind": "eval", "text": text, "step": 0, "total": cfg.train.steps, "status": ""})
        out = storage.join(cfg.train.storage, cfg.train.run_name, "eval")
        numbers = evaluate(
            checkpoint_uri(checkpoint),
            during.data,
            cfg.eval.while_training(),
            out,
            during.format,
            emit,
            cfg.train.steps,
        )
        try:
            tracking.log_late_evaluations(cfg)
        except Exception as err:  # noqa: BLE001 - W&B is a view of the results, which are on disk
            logger.warning("could not log the evaluation to W&B: %s", err)
        return numbers


def registered_checkpoints(run: str) -> list[str]:
    """The checkpoints Ray Train has registered for the run at `run` (kept by keep_checkpoints),
    through its public Result API, in step order; [] before the first."""
    from ray.train import Result
    from ray.train.v2.api.exceptions import RayTrainError

    path, fs = storage.ray_storage(run)
    quiet = logging.getLogger("ray.train")  # Ray announces the snapshot it reads at INFO
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))
    try:
        result = Result.from_path(path, storage_filesystem=fs)
    except RuntimeError:  # no run folder, or nothing registered yet
        return []
    except RayTrainError as err:  # read while keep_checkpoints removed a folder it names: look again later
        logger.info("reading %s's checkpoints: %s", run, err)
        return []
    finally:
        quiet.setLevel(level)
    uris = [checkpoint_uri(c) for c, _ in (result.best_checkpoints or [])]
    return sorted(uris, key=step_of)


def watch(
    run: str,
    data: str | EvalSet,
    cfg: EvalConfig,
    final_step: int,
    out: str | None = None,
    data_format: str = "auto",
    emit: Callable[[str], None] = print,
    poll_s: float = 10.0,
    idle_s: float | None = None,
) -> dict[int, dict]:
    """Follow a run (local or s3://): evaluate each checkpoint it registers that has no results
    under `out` (default `<run>/eval`), oldest first, until the checkpoint of `final_step` is done
    (or failed twice), or (`idle_s`) that long passes without a new checkpoint. A failed evaluation
    is tried once more on the next look, then left. Returns the curve."""
    out = out or storage.join(run, "eval")
    emit(f"watching {run} for checkpoints (to step {final_step}); results in {out}")
    seen, since = set(), time.time()
    while True:
        done = evaluated(out)
        registered = registered_checkpoints(run)
        if set(registered) - seen:
            seen, since = seen | set(registered), time.time()
        elif idle_s is not None and time.time() - since > idle_s:
            emit(f"no new checkpoint of {run} for {idle_s:.0f} s: stopped before step {final_step}")
            return done
        for checkpoint in registered:
            step = step_of(checkpoint)
            folder = storage.join(out, f"step_{step:08d}")
            if step in done or failed(_attempts(folder)) >= ATTEMPTS:
                continue
            # a failure is said in one line by evaluate, and tried again on the next look
            with contextlib.suppress(Exception):
                evaluate(checkpoint, data, cfg, out, data_format, emit, final_step)
        finished = evaluated(out)
        last = storage.join(out, f"step_{final_step:08d}")
        if final_step in finished or failed(_attempts(last)) >= ATTEMPTS:
            return finished
        time.sleep(poll_s)
