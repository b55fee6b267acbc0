"""`clippy-ray tune`: a grid over configs (tune/config.py, tune/grid.py) as a Ray Tune run. Each
trial is a full Ray Train + DeepSpeed run (Train V2 inside a Tune function trial, reporting through
TuneReportCallback) that then evaluates its final checkpoint with the parallel eval runner. ASHA
stops trials whose validation loss trails; running the command again resumes the sweep (finished
trials stay finished, an interrupted one resumes from its last checkpoint). Results: a table in the
shape of the paper's Table 3 and a bar plot (tune/results.py), written next to the Tune experiment.
"""

from __future__ import annotations

import contextlib
import os
import re

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from clippy_ray import config, storage
from clippy_ray.tune.config import SweepConfig
from clippy_ray.tune.grid import asha_never_stops, label, settings
from clippy_ray.tune.results import METRICS, write_results

PREFIX = "[sweep]"

# ------------------------------------------------------------------------------- one trial


def run_trial(params: dict, sweep: dict, trials: dict) -> None:
    """The Tune function: train (or resume) the trial's run, evaluate its final checkpoint, report."""
    from ray import tune
    from ray.data import DataContext
    from ray.tune.integration.ray_train import TuneReportCallback

    from clippy_ray.eval import headline, run_eval
    from clippy_ray.model.handoff import HANDOFF_DIR
    from clippy_ray.tracking import open_run
    from clippy_ray.train.state import checkpoint_uri
    from clippy_ray.train.trainer import fit

    DataContext.get_current().enable_progress_bars = False  # the sweep's trial lines are the progress here
    sw = config.from_dict(sweep, SweepConfig)
    name = label(sw, params["setting"])
    cfg = config.from_dict(trials[name])  # resolved on the driver (paths, base file)
    result = fit(cfg, callbacks=[TuneReportCallback()])
    final = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    final["finished"] = 1
    ckpt = checkpoint_uri(cfg, result.checkpoint)
    if sw.eval_data and ckpt is not None:
        out = storage.join(sw.storage, sw.name, "eval", name)
        report = run_eval(
            f"{ckpt}/{HANDOFF_DIR}", sw.eval_data, cfg.eval, out, log=lambda m: print(f"[{name}] {m}", flush=True)
        )
        numbers = headline(report["results"])
        final.update(numbers)
        if cfg.train.wandb.mode != "disabled":
            run = open_run(cfg)
            run.summary.update({f"eval/{k}": v for k, v in numbers.items()})
            run.finish()
    tune.report(final)


# ------------------------------------------------------------------------------- the sweep


class FinishingASHA(ASHAScheduler):
    """ASHA that never stops a trial on the report of its last step. Ray's ASHA puts a rung at
    max_t whenever max_t / grace_period is a power of the reduction factor, and cutting a trial
    there only throws away the evaluation of a model that has finished training."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self._time_attr, 0) >= self._max_t:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def _scheduler(sweep: SweepConfig, max_steps: int):
    s = sweep.scheduler
    if s.name == "fifo":
        return FIFOScheduler()
    return FinishingASHA(
        time_attr="step",
        metric=s.metric,
        mode=s.mode,
        max_t=max_steps,
        grace_period=min(s.grace_period, max_steps),
        reduction_factor=s.reduction_factor,
        stop_last_trials=False,
    )


def check_inputs(sweep: SweepConfig, trials: list[config.Config]) -> None:
    """On the driver, before any Ray work, what the trials will read, as `train` checks it: every
    trial's data (each distinct dataset once), weights (the inits the grid names, read as tensors
    only) and storage bucket, and the evaluation data. The first problem is one line."""
    from clippy_ray.train.trainer import check_data, check_eval_during_training, check_storage, check_weights

    datasets, weights, curves = set(), set(), set()
    for trial in trials:
        d, m = trial.data, trial.model
        if (d.train, d.val, d.image_column, d.caption_column) not in datasets:
            datasets.add((d.train, d.val, d.image_column, d.caption_column))
            check_data(trial)
        if (m.image.pretrained, m.text.pretrained, m.text.tokenizer) not in weights:
            weights.add((m.image.pretrained, m.text.pretrained, m.text.tokenizer))
            check_weights(trial)
        during = trial.eval.during_training
        if (during.data, tuple(during.tasks), during.max_rows) not in curves:
            curves.add((during.data, tuple(during.tasks), during.max_rows))
            check_eval_during_training(trial)
    check_storage(trials[0])
    if sweep.eval_data:
        storage.require(sweep.eval_data, "eval_data", "upload the evaluation data or fix the URI")


def dry_run(sweep: SweepConfig, trials: list[config.Config]) -> list[str]:
    """The sweep's plan (the first trial's run plan, then one line per trial) after checking its
    data, every trial's weights and the evaluation data are reachable; nothing is started."""
    from clippy_ray.train.trainer import describe

    check_inputs(sweep, trials)
    lines = [
        f"sweep {sweep.name}: {len(trials)} trials, at most {sweep.max_concurrent_trials} at once, "
        f"scheduler {sweep.scheduler.name}, under {storage.join(sweep.storage, sweep.name)}"
    ]
    lines += describe(trials[0])
    for setting, trial in zip(settings(sweep), trials):
        t = trial.train
        lines.append(
            f"trial {label(sweep, setting)}: {t.num_workers} workers x {t.cpus_per_worker} CPU"
            f"{' + 1 GPU' if t.use_gpu else ''}, {t.steps} steps"
        )
    if note := asha_never_stops(sweep, trials):
        lines.append(f"note: {note}")
    return lines


class TrialLines(Callback):
    """The sweep's console: one line per trial event (started, each training report, finished with
    its evaluation's numbers, stopped early, failed), in place of Tune's status table every 30 s.
    It prints rather than holding a function: Tune pickles it with the experiment, and a resumed
    sweep brings it back."""

    def __init__(self, sweep: SweepConfig, steps: dict[str, int]):
        self.sweep = sweep
        self.steps = steps  # label -> the trial's train.steps

    def _name(self, trial) -> str:
        return label(self.sweep, (trial.config or {}).get("setting", {}))

    def _say(self, text: str) -> None:
        print(f"{PREFIX} {text}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._say(f"{self._name(trial)} started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("finished") or "loss" not in result:
            return  # the last report (with the evaluation) is the completion line
        name = self._name(trial)
        text = f"{name} step {result.get('step', '?')}/{self.steps.get(name, '?')} | loss {result['loss']:.4f}"
        if result.get("val_loss") is not None:
            text += f" | val loss {result['val_loss']:.3f}"
        self._say(text)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        name = self._name(trial)
        if not last.get("finished"):
            self._say(f"{name} stopped early at step {last.get('step', '?')}")
            return
        numbers = [f"{title.split(' (')[0]} {last[key]:.1f}" for key, title in METRICS if last.get(key) is not None]
        if last.get("val_loss") is not None:
            numbers.append(f"val loss {last['val_loss']:.3f}")
        took = last.get("time_total_s", 0)
        self._say(f"{name} finished in {int(took // 60)}m{int(took % 60):02d}s: " + " | ".join(numbers))

    def on_trial_error(self, iteration, trials, trial, **info):
        where = f" (details: {trial.error_file})" if trial.error_file else ""
        self._say(f"{self._name(trial)} failed{where}")


def run_sweep(sweep: SweepConfig, trials: list[config.Config], log=print, verbose: bool = False) -> list[dict]:
    """Run (or resume) the sweep; write results.md / results.json / results.png; return the rows.
    The console gets one line per trial event (`TrialLines`); `verbose` adds Tune's status table."""
    from ray import tune

    # Training reports carry val_loss only on validation steps; ASHA skips the others.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if note := asha_never_stops(sweep, trials):
        log(f"{PREFIX} note: {note}")
    resolved = {label(sweep, s): config.to_dict(t) for s, t in zip(settings(sweep), trials)}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=config.to_dict(sweep), trials=resolved), {"cpu": sweep.trial_cpus}
    )
    path, fs = storage.ray_storage(sweep.storage)
    experiment = f"{path.rstrip('/')}/{sweep.name}"
    try:
        resumable = tune.Tuner.can_restore(experiment, storage_filesystem=fs)
    except OSError as err:
        raise storage.StorageError(
            f"{storage.join(sweep.storage, sweep.name)}: {str(err).strip().splitlines()[0]}"
        ) from None
    if resumable:
        log(f"{PREFIX} resuming {storage.join(sweep.storage, sweep.name)} (finished trials are kept)")
        tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True, storage_filesystem=fs)
    else:
        grid = settings(sweep)
        log(f"{PREFIX} {len(grid)} trials: " + ", ".join(label(sweep, s) for s in grid))
        tuner = tune.Tuner(
            trainable,
            param_space={"setting": tune.grid_search(grid)},
            tune_config=tune.TuneConfig(
                scheduler=_scheduler(sweep, max(t.train.steps for t in trials)),
                max_concurrent_trials=sweep.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=path,
                storage_filesystem=fs,
                verbose=1 if verbose else 0,
                callbacks=[TrialLines(sweep, {label(sweep, s): t.train.steps for s, t in zip(grid, trials)})],
            ),
        )
    _start_ray_data_here()
    with _tune_output(verbose):
        results = tuner.fit()
    rows = collect_rows(sweep, results)
    write_results(sweep, rows)
    return rows


@contextlib.contextmanager
def _tune_output(verbose: bool):
    """Tune's new output engine prints its experiment box and a closing status table whatever
    `verbose` says; its legacy engine prints nothing at verbose 0. Quiet: the legacy one, for the
    time of the run (TrialLines is the console then)."""
    if verbose:
        yield
        return
    saved = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved


def _start_ray_data_here() -> None:
    """Run one tiny dataset on the sweep's driver (a 0-CPU task, so a CPU-less head can run it).
    Ray Data starts two detached actors (its stats actor and autoscaling coordinator) on the node
    of the first process that runs a dataset. Left to the trials, that is an autoscaled worker
    node, and a node holding an actor never counts as idle: the autoscaler would never remove it.
    Started here first, they live on the driver's node (the head) and the trials reuse them."""
    import ray

    ray.data.from_items([0]).map(lambda row: row, num_cpus=0).materialize()


def collect_rows(sweep: SweepConfig, results) -> list[dict]:
    """One row per grid point, in grid order, from Tune's last result of each trial."""
    by_label = {}
    for r in results:
        setting = (r.config or {}).get("setting", {})
        m = r.metrics or {}
        if r.error is not None:
            lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(r.error)).strip().splitlines() if ln.strip()]
            status = f"error: {lines[-1][:100] if lines else type(r.error).__name__}"
        elif m.get("finished"):
            status = "finished"
        else:
            status = f"stopped early at step {m.get('step', '?')}"
        name = label(sweep, setting)
        by_label[name] = {
            "setting": setting,
            "label": name,
            "status": status,
            "val_loss": m.get("val_loss"),
            "step": m.get("step"),
            **{k: m.get(k) for k, _ in METRICS},
            "path": r.path,
        }
    return [
        by_label.get(label(sweep, s), {"setting": s, "label": label(sweep, s), "status": "not run"})
        for s in settings(sweep)
    ]
