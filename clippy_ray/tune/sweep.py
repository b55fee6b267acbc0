"""`clippy-ray tune`: the paper's ablation as a Ray Tune grid. Each trial is a full Ray Train +
DeepSpeed run (Train V2 inside a Tune function trial, reporting through TuneReportCallback) that
then evaluates its final checkpoint with the parallel eval runner. ASHA stops trials whose
validation loss trails; running the command again resumes the sweep (finished trials stay
finished, an interrupted one resumes from its last checkpoint). Results: a table in the shape of
the paper's Table 3 and a bar plot, written next to the Tune experiment.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from clippy_ray import config, storage
from clippy_ray.config import SweepConfig

METRICS = (("cls_top1", "cls top-1 (%)"), ("seg_miou", "seg mIoU (%)"), ("unsup_jaccard", "unsup Jaccard (%)"),
           ("robust_gap", "robust gap (pts)"))


# ------------------------------------------------------------------------------- the grid

def settings(sweep: SweepConfig) -> list[dict]:
    """Every point of the grid, in a stable order: [{axis: value, ...}, ...]."""
    axes = list(sweep.axes)
    return [dict(zip(axes, values)) for values in itertools.product(*(sweep.axes[a] for a in axes))]


def label(setting: dict) -> str:
    """A short, path-safe trial name: aggregation=max, token_subsampling=0.5 -> max_sub0.5."""
    parts = []
    for axis, value in setting.items():
        if axis == "aggregation":
            parts.append(str(value))
        elif axis == "token_subsampling":
            parts.append("sub-off" if value == "off" else f"sub{value}")
        else:
            parts.append(f"{axis.split('_')[0]}-{value}")
    return "_".join(parts)


def trial_overrides(sweep: SweepConfig, setting: dict) -> list[str]:
    """The config overrides one grid point stands for."""
    out = []
    for axis, value in setting.items():
        if axis == "aggregation":
            out.append(f"model.aggregation={value}")
        elif axis == "token_subsampling":
            out += ["model.token_keep_count=null",
                    "model.token_keep_ratio=null" if value == "off" else f"model.token_keep_ratio={value}"]
        elif axis == "image_init":
            out.append("model.image.pretrained=null" if value == "random"
                       else f"model.image.pretrained={sweep.image_inits[value]}")
        elif axis == "text_init":
            if value == "random":
                out.append("model.text.pretrained=null")
            else:
                uri = sweep.text_inits[value]
                out += [f"model.text.pretrained={uri}", f"model.text.tokenizer={uri}"]
    return out


def _absolute(uri: str | None) -> str | None:
    """Local paths made absolute: Tune runs each trial in its own working directory."""
    if not uri or "://" in uri or uri == "byte":
        return uri
    return os.path.abspath(uri)


def trial_config(sweep: SweepConfig, setting: dict) -> config.Config:
    cfg = config.load(sweep.base, list(sweep.overrides) + trial_overrides(sweep, setting) + [
        f"train.run_name={label(setting)}", f"train.storage={storage.join(sweep.storage, sweep.name, 'runs')}",
        f"train.wandb.group={sweep.name}"])
    cfg.data.train, cfg.data.val = _absolute(cfg.data.train), _absolute(cfg.data.val)
    cfg.model.image.pretrained = _absolute(cfg.model.image.pretrained)
    cfg.model.text.pretrained = _absolute(cfg.model.text.pretrained)
    cfg.model.text.tokenizer = _absolute(cfg.model.text.tokenizer)
    return cfg


def load_sweep(path: str | None, overrides: list[str] | None = None) -> tuple[SweepConfig, list[config.Config]]:
    """The sweep and every trial's resolved config; any bad field of either fails here, at once."""
    sweep = config.load(path, overrides, cls=SweepConfig)
    if not sweep.base:
        raise config.ConfigError(["base: not set; name the training config every trial starts from "
                                  "(e.g. base: configs/demo.yaml)"])
    sweep.storage, sweep.eval_data = _absolute(sweep.storage), _absolute(sweep.eval_data)
    trials = []
    for setting in settings(sweep):
        try:
            trials.append(trial_config(sweep, setting))
        except config.ConfigError as err:
            raise config.ConfigError([f"trial {label(setting)}: {e}" for e in err.errors]) from None
    # Local data that is not there would fail every trial, one after the other: say so now.
    missing = [(key, uri) for key, uri in (("data.train", trials[0].data.train), ("data.val", trials[0].data.val),
                                           ("eval_data", sweep.eval_data))
               if uri and not storage.is_s3(uri) and not os.path.exists(uri)]
    if missing:
        raise config.ConfigError([f"{key}: {uri} does not exist; make the data first (`make demo`, or "
                                  f"`clippy-ray data make-benchmark --out DIR --rows N`) or point {key} at it" for key, uri in missing])
    return sweep, trials


# ------------------------------------------------------------------------------- one trial

def run_trial(params: dict, sweep: dict, trials: dict) -> None:
    """The Tune function: train (or resume) the trial's run, evaluate its final checkpoint, report."""
    from ray import tune
    from ray.data import DataContext
    from ray.tune.integration.ray_train import TuneReportCallback

    from clippy_ray.eval.runner import headline, run_eval
    from clippy_ray.train.checkpoint import HANDOFF_DIR
    from clippy_ray.train.progress import open_wandb
    from clippy_ray.train.trainer import checkpoint_uri, fit

    DataContext.get_current().enable_progress_bars = False  # Tune's trial table is the progress here
    sw = config.from_dict(sweep, SweepConfig)
    setting = params["setting"]
    cfg = config.from_dict(trials[label(setting)])  # resolved on the driver (paths, base file)
    result = fit(cfg, callbacks=[TuneReportCallback()])
    final = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    final["finished"] = 1
    ckpt = checkpoint_uri(cfg, result)
    if sw.eval_data and ckpt is not None:
        out = storage.join(sw.storage, sw.name, "eval", label(setting))
        report = run_eval(f"{ckpt}/{HANDOFF_DIR}", sw.eval_data, cfg.eval, out,
                          log=lambda m: print(f"[{label(setting)}] {m}", flush=True))
        numbers = headline(report["results"])
        final.update(numbers)
        if cfg.train.wandb.mode != "disabled":
            run = open_wandb(cfg)
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
    return FinishingASHA(time_attr="step", metric=s.metric, mode=s.mode, max_t=max_steps,
                         grace_period=min(s.grace_period, max_steps), reduction_factor=s.reduction_factor,
                         stop_last_trials=False)


def run_sweep(sweep: SweepConfig, trials: list[config.Config], log=print) -> list[dict]:
    """Run (or resume) the sweep; write results.md / results.json / results.png; return the rows."""
    from ray import tune

    from clippy_ray.train.trainer import run_storage

    # Training reports carry val_loss only on validation steps; ASHA skips the others.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    resolved = {label(s): config.to_dict(t) for s, t in zip(settings(sweep), trials)}
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=config.to_dict(sweep), trials=resolved),
                                    {"cpu": sweep.trial_cpus})
    path, fs = run_storage(sweep.storage)
    experiment = f"{path.rstrip('/')}/{sweep.name}"
    try:
        resumable = tune.Tuner.can_restore(experiment, storage_filesystem=fs)
    except OSError as err:
        raise storage.StorageError(f"{storage.join(sweep.storage, sweep.name)}: {str(err).strip().splitlines()[0]}") from None
    if resumable:
        log(f"[sweep] resuming {storage.join(sweep.storage, sweep.name)} (finished trials are kept)")
        tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True, storage_filesystem=fs)
    else:
        grid = settings(sweep)
        log(f"[sweep] {len(grid)} trials: " + ", ".join(label(s) for s in grid))
        tuner = tune.Tuner(
            trainable, param_space={"setting": tune.grid_search(grid)},
            tune_config=tune.TuneConfig(scheduler=_scheduler(sweep, max(t.train.steps for t in trials)),
                                        max_concurrent_trials=sweep.max_concurrent_trials),
            run_config=tune.RunConfig(name=sweep.name, storage_path=path, storage_filesystem=fs, verbose=1))
    results = tuner.fit()
    rows = collect_rows(sweep, results)
    write_results(sweep, rows)
    return rows


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
        by_label[label(setting)] = {"setting": setting, "label": label(setting), "status": status,
                                    "val_loss": m.get("val_loss"), "step": m.get("step"),
                                    **{k: m.get(k) for k, _ in METRICS}, "path": r.path}
    return [by_label.get(label(s), {"setting": s, "label": label(s), "status": "not run"}) for s in settings(sweep)]


def _num(v, digits: int = 1) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown_table(sweep: SweepConfig, rows: list[dict]) -> str:
    axes = list(sweep.axes)
    head = axes + [name for _, name in METRICS] + ["val loss", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["setting"].get(a)) for a in axes] + [_num(r.get(k)) for k, _ in METRICS]
        cells += [_num(r.get("val_loss"), 3), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], title: str) -> bytes:
    """Grouped bars: one group per trial, one bar per metric."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 4), 4))
    width = 0.8 / len(METRICS)
    for i, (key, name) in enumerate(METRICS):
        values = [r.get(key) if r.get(key) is not None else 0.0 for r in rows]
        ax.bar([x + (i - (len(METRICS) - 1) / 2) * width for x in range(len(rows))], values, width, label=name)
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=20, ha="right")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("%  (gap: points)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never on them
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_results(sweep: SweepConfig, rows: list[dict]) -> None:
    root = storage.join(sweep.storage, sweep.name)
    md = (f"# Sweep `{sweep.name}`\n\nbase: `{sweep.base}`, overrides: `{' '.join(sweep.overrides) or '-'}`, "
          f"eval data: `{sweep.eval_data}`\n\n" + markdown_table(sweep, rows) + "\n![results](results.png)\n")
    storage.write_bytes(storage.join(root, "results.md"), md.encode())
    storage.write_bytes(storage.join(root, "results.json"),
                        json.dumps({"sweep": config.to_dict(sweep), "rows": rows}, indent=2, default=str).encode())
    storage.write_bytes(storage.join(root, "results.png"), plot(rows, f"sweep {sweep.name}"))
