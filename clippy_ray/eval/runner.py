"""`clippy-ray eval` on Ray: fan the tasks' shards out to a pool of actors (each holds the model
once), hand each task the sums of its shards in shard order, and have the report written.

Shards are fixed by the dataset and eval.rows_per_shard, never by the worker count, and sums are
reduced in shard order, so 1 worker and N workers give identical numbers. Nothing here knows what
a task computes: that is eval/tasks/.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray
from ray.util import ActorPool
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from clippy_ray.config import EvalConfig
from clippy_ray.eval import report
from clippy_ray.eval.datasets import EvalDataError, EvalSet, Shard, load_shard, open_eval_set
from clippy_ray.eval.evaluator import build_evaluator, check_settings
from clippy_ray.eval.tasks import TASKS, ordered
from clippy_ray.model.handoff import read_config

Job = tuple[str, str, Shard]  # (task name, split, shard)


def eval_config(checkpoint: str, overrides: list[str] | None = None, flags: dict | None = None) -> EvalConfig:
    """The checkpoint's own eval settings (from its resolved config), then `eval.key=value`
    overrides, then command-line flags."""
    from clippy_ray import config

    saved = read_config(checkpoint).get("eval") or {}
    extra = config.parse_overrides(overrides or [])
    unknown = [k for k in extra if k != "eval"]
    if unknown:
        raise config.ConfigError([f"{k}: only eval.* keys can be overridden here" for k in unknown])
    data = config.merge(config.merge(saved, extra.get("eval", {})), flags or {})
    return config.from_dict({"eval": data}).eval


@ray.remote
class EvalWorker:
    """One model on one device; evaluates shards of any task."""

    def __init__(self, checkpoint: str, data: EvalSet, cfg: EvalConfig, threads: int):
        import os

        import torch

        if cfg.yield_cpu:  # beside training on shared CPUs: the scheduler gives training the cores first
            os.nice(19)
        torch.set_num_threads(threads)
        self.data = data
        self.evaluator = build_evaluator(checkpoint, data, cfg)
        self.rows_cache: dict = {}  # the last parquet row groups read (this worker's, this run's)

    def resolution(self) -> int:
        return self.evaluator.resolution

    def run(self, index: int, job: Job) -> tuple[int, dict]:
        task, _, shard = job
        return index, TASKS[task].run(self.evaluator, load_shard(shard, self.data.has_background, self.rows_cache))

    def pictures(self, task: str, shard: Shard, rows: int) -> list[dict]:
        samples = load_shard(shard, self.data.has_background, self.rows_cache)[:rows]
        return TASKS[task].pictures(self.evaluator, samples)


def plan(data: EvalSet, tasks: list[str]) -> list[Job]:
    """Every shard of every task, in the order the tasks were asked for: the reduce order."""
    return [(name, split, shard) for name in tasks for split, shard in TASKS[name].jobs(data)]


def reduce_results(data: EvalSet, jobs: list[Job], parts: list[dict]) -> dict:
    """Hand each task the sums of its shards (per split, in job order) -> {task: metrics}, in report order."""
    by_task: dict[str, dict[str, list[dict]]] = {}
    for (task, split, _), part in zip(jobs, parts):
        by_task.setdefault(task, {}).setdefault(split, []).append(part)
    return {task.name: task.reduce(by_task[task.name], data) for task in ordered(by_task)}


def _start_workers(checkpoint: str, data: EvalSet, cfg: EvalConfig, count: int, use_gpu: bool) -> list:
    # placement_group=None: inside a Tune trial the workers must not be squeezed into the trial's
    # own placement group (it holds only the trial process's CPU).
    actor_cls = EvalWorker.options(
        num_cpus=cfg.cpus_per_worker,
        num_gpus=1 if use_gpu else 0,
        resources=cfg.worker_resources,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )
    threads = max(1, int(cfg.cpus_per_worker))
    return [actor_cls.remote(checkpoint, data, cfg, threads) for _ in range(count)]


def _run_jobs(actors: list, jobs: list[Job], progress: Callable[[int, int], None] | None) -> list[dict]:
    """Every job's sums, in job order."""
    pool = ActorPool(actors)
    parts: dict[int, dict] = {}
    # Unordered, so a worker that finishes early takes the next shard at once; sums are then
    # added in shard order, which keeps the numbers independent of the worker count.
    for i, (index, part) in enumerate(pool.map_unordered(lambda a, job: a.run.remote(*job), enumerate(jobs)), start=1):
        parts[index] = part
        if progress is not None:
            progress(i, len(jobs))
    return [parts[i] for i in range(len(jobs))]


def choose_tasks(data: EvalSet, tasks: tuple[str, ...], named: bool) -> tuple[list[str], dict[str, str]]:
    """(the tasks to run, {skipped task: why}): `tasks` the data can serve. When the user `named`
    them, one it cannot serve is an error, and so is none left to run."""
    tasks = list(dict.fromkeys(tasks))
    why = data.tasks_supported()
    skipped = {t: why[t] for t in tasks if why[t]}
    runnable = [t for t in tasks if t not in skipped]
    if skipped and (named or not runnable):
        blocked = "; ".join(f"{t}: {w}" for t, w in skipped.items())
        raise EvalDataError(f"cannot run {blocked} (choose --tasks from the ones the data supports)")
    return runnable, skipped


def run_eval(
    checkpoint: str,
    data_uri: str | EvalSet,
    cfg: EvalConfig,
    out: str | None = None,
    fmt: str = "auto",
    classes: str | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[int, int], None] | None = None,
    tasks_named: bool = False,
) -> dict:
    """Evaluate a handoff checkpoint on a dataset (a URI, or one `open_eval_set` listed already);
    returns (and writes under `out`) the results. Tasks the data cannot serve are skipped with a
    note, or, when `tasks_named` (the user chose cfg.tasks), refused. `log` gets one line per event;
    `progress(done, total)` is called as shards finish."""
    start = time.time()
    data = (
        data_uri
        if isinstance(data_uri, EvalSet)
        else open_eval_set(data_uri, fmt, cfg.rows_per_shard, cfg.max_rows, classes)
    )
    tasks, skipped = choose_tasks(data, cfg.tasks, tasks_named)
    if skipped:
        log("eval: skipped " + "; ".join(f"{t} ({w})" for t, w in skipped.items()))
    settings = check_settings(cfg, data)
    jobs = plan(data, tasks)
    # From the config, never from what the cluster has right now: GPU nodes scaled to zero would
    # otherwise turn a GPU evaluation into a silent CPU one; asking for GPUs makes the autoscaler add them.
    use_gpu = bool(cfg.use_gpu)
    workers = max(1, min(cfg.workers, len(jobs)))
    actors = _start_workers(checkpoint, data, cfg, workers, use_gpu)
    log(
        f"eval: {len(jobs)} shards of {data.fmt} data ({', '.join(tasks)}) on {workers} worker(s)"
        f"{' with GPUs' if use_gpu else ''}"
    )
    resolution = ray.get([a.resolution.remote() for a in actors])[0]  # every worker has loaded the model
    ready = time.time()
    results = reduce_results(data, jobs, _run_jobs(actors, jobs, progress))
    meta = {
        "checkpoint": checkpoint,
        "data": data.uri,
        "format": data.fmt,
        "tasks": tasks,
        "skipped": skipped,
        "resolution": resolution,
        **settings,
        "workers": workers,
        "setup_seconds": ready - start,
        "task_seconds": time.time() - ready,
        "pictures": [],
    }
    pictures: dict[str, bytes] = {}
    if cfg.examples and out:
        for task in report.pictured(tasks, data):
            items = ray.get(actors[0].pictures.remote(task.name, data.splits[task.picture_split][0], cfg.examples))
            pictures[report.picture_name(task)] = report.examples_png(task, items, data)
        meta["pictures"] = list(pictures)
    for a in actors:
        ray.kill(a)
    meta["seconds"] = time.time() - start
    evaluation = {"results": results, "meta": meta}
    if out:
        report.write(out, evaluation, pictures, log)
    return evaluation
