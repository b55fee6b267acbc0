"""The proving ground: a multi-node Ray cluster simulated on one machine (tests/sim_cluster.py: Ray's
own cluster_utils, token authentication on, the job server on the head), with the moto S3 server as
the only storage its runs share. Jobs go in through the real `ray job submit`, as the README's "On a
cluster" section runs them.

The pytest process never joins these clusters (they run in processes of their own and are reached
through the `ray` CLI and the dashboard's HTTP API), so the session's in-process Ray (`ray_local`)
is left alone whether another test started it or not."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clippy_ray import storage
from tests.conftest import TINY
from tests.sim_cluster import start_autoscaling_cluster, start_cluster, start_from_commands

pytestmark = [pytest.mark.integration, pytest.mark.multinode]

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "multinode"
# What the README's `ray job submit` lines add: the project as the working dir, jobs/runtime_env.yaml.
JOB = ["--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml"]


@pytest.fixture(scope="module")
def s3_bench(s3_server) -> str:
    """Tiny benchmark rows (32 px) in the bucket every cluster of this module shares."""
    import boto3
    import pyarrow as pa

    from clippy_ray.data.benchmark import BenchmarkSpec, make_rows
    from clippy_ray.data.commands import BENCHMARK_SCHEMA, write_table

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=BUCKET)
    uri = f"s3://{BUCKET}/bench"
    spec = BenchmarkSpec(seed=0, image_size=32)
    # Straight from the generator: make_benchmark fans out Ray tasks, and this process starts no Ray.
    for split, rows in (("train", 64), ("val", 16)):
        table = pa.Table.from_pydict(make_rows(spec, split, 0, rows), schema=BENCHMARK_SCHEMA)
        write_table(table, f"{uri}/{split}/part-00000.parquet")
    return uri


@pytest.fixture
def cluster_factory(s3_server, tmp_path):
    """`start(head, workers)` -> a running SimCluster (tests/sim_cluster.py): a head with `head`
    resources and worker nodes by name, e.g. {"w1": {"CPU": 1, "gpu_node": 1}}; the test can add
    and remove nodes by name. The nodes inherit the S3 server's endpoint and keys from the
    environment. Every cluster started is ended after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda head, workers: stack.enter_context(start_cluster(head, workers, tmp_path))


def submit(cluster, submission_id: str, *entrypoint: str, options: tuple[str, ...] = ()):
    """`ray job submit` from the project root, as in the README; returns the CLI's output."""
    out = cluster.ray(
        "job",
        "submit",
        "--address",
        cluster.dashboard,
        "--submission-id",
        submission_id,
        *JOB,
        *options,
        "--",
        "python",
        *entrypoint,
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 0, f"job {submission_id} failed:\n{out.stdout[-8000:]}"
    return out.stdout


def job_status(cluster, submission_id: str) -> str:
    """What `ray job status` says of a job, e.g. "Job 'x' succeeded" (without colour codes)."""
    out = cluster.ray("job", "status", "--address", cluster.dashboard, submission_id).stdout
    return re.sub(r"\x1b\[[0-9;]*m", "", out)


def tiny_run(data: str, *overrides: str) -> list[str]:
    """Overrides for a few steps of the tiny model on the benchmark rows in S3."""
    return [
        *TINY,
        f"data.train={data}/train",
        f"data.val={data}/val",
        "data.shuffle_buffer=16",
        "data.decode_batch_size=16",
        "data.read_cpus=0.1",
        "train.global_batch_size=8",
        "train.warmup_steps=1",
        "train.val_batches=1",
        "train.wandb.mode=disabled",
        *overrides,
    ]


def sweep_args(name: str, data: str, axes: str, *overrides: str) -> list[str]:
    """`jobs/tune.py` arguments: configs/ablation_demo.yaml (its base, configs/demo.yaml, from the
    working dir) with the tiny model on the benchmark rows in S3, results under s3://BUCKET/sweeps."""
    trial = tiny_run(
        data,
        "data.val=null",
        "eval.during_training.data=null",  # configs/demo.yaml's curve data is a local folder
        "train.steps=2",
        "train.checkpoint_every=2",
        "train.log_every=1",
        *overrides,
    )
    return [
        "--config",
        "configs/ablation_demo.yaml",
        f"name={name}",
        f"storage=s3://{BUCKET}/sweeps",
        "eval_data=null",  # the table needs no evaluation here (and, FIFO, no validation loss)
        "overrides=[" + ", ".join(json.dumps(a) for a in trial) + "]",
        f"axes={axes}",
    ]


def _download(uri: str, folder: Path) -> list[str]:
    """Every object under an s3:// prefix into `folder`; returns the relative names."""
    import boto3

    bucket, prefix = uri[len("s3://") :].split("/", 1)
    client = boto3.client("s3")
    names = []
    for item in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", []):
        name = item["Key"][len(prefix) + 1 :]
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, item["Key"], str(folder / name))
        names.append(name)
    return names


class NodeSampler:
    """Polls a cluster's alive worker nodes every `period` seconds in a thread: [(seconds, count)]."""

    def __init__(self, cluster, period: float = 1.0):
        self.cluster, self.period, self.samples = cluster, period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.time()

    def _run(self):
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.samples.append((round(time.time() - self._start), self.cluster.alive_workers()))
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def changes(self) -> list[tuple[int, int]]:
        """The samples where the count changed (and the first and last)."""
        keep = [s for i, s in enumerate(self.samples) if i == 0 or s[1] != self.samples[i - 1][1]]
        return keep + ([self.samples[-1]] if self.samples and keep[-1] != self.samples[-1] else [])


# ---------------------------------------------------------------------- tests


def test_the_launchers_ray_start_lines_make_a_cluster_whose_worker_joins_with_the_token_file(tmp_path):
    """cluster/aws.yaml's head and worker `ray start` lines, given only the token file its mount
    puts on every node: the head checks tokens, the worker presents one and joins, and a client
    set up as the README says (the token, RAY_AUTH_MODE=token) reaches the job server."""
    import yaml

    launcher = yaml.safe_load((ROOT / "cluster/aws.yaml").read_text())
    (head,) = [c for c in launcher["head_start_ray_commands"] if "ray start" in c]
    (worker,) = [c for c in launcher["worker_start_ray_commands"] if "ray start" in c]
    with start_from_commands(head, worker, tmp_path) as cluster:
        with pytest.raises(OSError, match="403"):
            cluster.get("/api/jobs/", token="not-the-token")
        deadline = time.time() + 180  # a loaded 2-core box takes a while to start a raylet
        while cluster.alive_workers() < 1:
            gone = cluster.procs["worker"].poll() is not None
            assert time.time() < deadline and not gone, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(1)
        assert "[]" in cluster.ray("job", "list", "--address", cluster.dashboard).stdout


def test_train_job_spreads_over_two_nodes_and_an_eval_job_on_a_new_node_reads_its_checkpoint_from_s3(
    cluster_factory, s3_bench, tmp_path
):
    start = time.time()
    node = {"CPU": 1, "train_node": 1}  # one training worker per node: the two workers land on two nodes
    cluster = cluster_factory({"CPU": 0}, {"w1": node, "w2": node})
    # Token authentication is on: the job server refuses a request without the cluster's token.
    with pytest.raises(OSError, match="403"):
        cluster.get("/api/jobs/", token="not-the-token")

    runs = f"s3://{BUCKET}/runs"
    train = tiny_run(
        s3_bench,
        f"train.storage={runs}",
        "train.run_name=two-nodes",
        "train.num_workers=2",
        "train.worker_resources={train_node: 1}",
        # a node has 1 CPU and its training worker 0.5: a read and a decode task fit beside it
        "train.cpus_per_worker=0.5",
        "data.decode_cpus=0.4",
        "train.steps=4",
        "train.checkpoint_every=2",
        "train.log_every=2",
    )
    logs = submit(cluster, "train-1", "jobs/train.py", *train)
    ckpt = f"{runs}/two-nodes/step_00000004"
    assert f"checkpoint: {ckpt}" in logs
    assert "Job 'train-1' succeeded" in job_status(cluster, "train-1")
    assert storage.exists(f"{ckpt}/model/model.safetensors")
    # each rank's part of the optimizer state, written from its own node
    assert storage.exists(f"{ckpt}/state/rank00000.safetensors") and storage.exists(
        f"{ckpt}/state/rank00001.safetensors"
    )
    workers = cluster.actors("RayTrainWorker")
    assert {a["node_id"] for a in workers} == {cluster.node_ids["w1"], cluster.node_ids["w2"]}, workers
    trained_at = time.time()

    # The training nodes go (their disks with them) and a node that never trained joins: the
    # checkpoint can only reach it through S3.
    evaluator = cluster.add_node("evaluator", {"CPU": 1, "eval_node": 3})
    cluster.remove_node("w1")
    cluster.remove_node("w2")
    out = f"s3://{BUCKET}/eval/two-nodes"
    evaluate = [
        "jobs/eval.py",
        "--checkpoint",
        ckpt,
        "--data",
        s3_bench,
        "--format",
        "benchmark",
        "--tasks",
        "cls,seg",
        "--out",
        out,
        "--workers",
        "2",
        "eval.cpus_per_worker=0.5",
        "eval.worker_resources={eval_node: 1}",
        "eval.rows_per_shard=8",
        "eval.examples=2",
        "eval.templates=simple",
    ]
    # The driver needs the node's resource too: it runs there, not on the head. --no-wait, then
    # follow the logs and read the status, as the README's step 5.
    submit(cluster, "eval-1", *evaluate, options=("--no-wait", "--entrypoint-resources", '{"eval_node": 1}'))
    follow = cluster.ray("job", "logs", "--address", cluster.dashboard, "--follow", "eval-1", timeout=600).stdout
    assert "Job 'eval-1' succeeded" in job_status(cluster, "eval-1"), follow[-6000:]
    assert "eval: 4 shards of benchmark data (cls, seg) on 2 worker(s)" in follow
    assert cluster.job("eval-1")["driver_node_id"] == evaluator
    assert {a["node_id"] for a in cluster.actors("EvalWorker")} == {evaluator}

    # Fetch the results from storage (the README's `aws s3 cp --recursive`, here with boto3).
    fetched = _download(out, tmp_path / "results")
    assert {"results.json", "results.md", "seg_examples.png"} <= set(fetched)
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["results"]["cls"]["rows"] == 16 and 0 <= results["results"]["seg"]["miou"] <= 100
    assert results["meta"]["checkpoint"] == ckpt and results["meta"]["workers"] == 2
    print(
        f"\n[multinode] train job {trained_at - start:.0f} s (incl. cluster start), "
        f"eval job {time.time() - trained_at:.0f} s, total {time.time() - start:.0f} s"
    )


AXES_ONE_TRIAL = '{aggregation: [avg], token_subsampling: ["off"]}'  # both of ablation_demo's axes, one value each


def test_a_sweep_job_runs_its_trial_on_a_worker_node_and_writes_the_table_to_s3(cluster_factory, s3_bench):
    start = time.time()
    cluster = cluster_factory({"CPU": 0}, {"w1": {"CPU": 1}})  # the trial can only run on the worker
    # the worker has 1 CPU: the trial (0.1), its training worker, a read and a decode task fit on it
    overrides = ("train.num_workers=1", "train.cpus_per_worker=0.4", "data.decode_cpus=0.3")
    logs = submit(cluster, "sweep-1", "jobs/tune.py", *sweep_args("job", s3_bench, AXES_ONE_TRIAL, *overrides))
    assert "Job 'sweep-1' succeeded" in job_status(cluster, "sweep-1")
    assert f"results: s3://{BUCKET}/sweeps/job/results.md" in logs and "| avg | off |" in logs
    rows = json.loads(storage.fetch(f"s3://{BUCKET}/sweeps/job/results.json").read_text())["rows"]
    assert [(r["label"], r["status"], r["step"]) for r in rows] == [("avg_sub-off", "finished", 2)]
    assert {a["node_id"] for a in cluster.actors("RayTrainWorker")} == {cluster.node_ids["w1"]}
    print(f"\n[multinode] sweep job {time.time() - start:.0f} s (incl. cluster start)")


def test_an_autoscaled_sweep_grows_from_zero_worker_nodes_runs_every_trial_and_shrinks_back(
    s3_server, s3_bench, tmp_path
):
    start = time.time()
    sweep_node = {"resources": {"CPU": 1, "sweep_node": 1}, "min_workers": 0, "max_workers": 2}
    with start_autoscaling_cluster({"CPU": 0}, {"sweep_node": sweep_node}, tmp_path, idle_timeout_minutes=0.2) as c:
        up = time.time()
        sweep = sweep_args(
            "scale",
            s3_bench,
            '{aggregation: [max, avg], token_subsampling: ["off"]}',  # two trials, both at once
            "train.num_workers=1",
            "train.worker_resources={sweep_node: 1}",  # one trial's worker per node: two trials, two nodes
            "train.cpus_per_worker=0.4",  # as in the sweep job above
            "data.decode_cpus=0.3",
        )
        sweep.append("max_concurrent_trials=2")
        with NodeSampler(c) as sampler:
            assert c.alive_workers() == 0
            # The job's driver, run as `ray job submit` would run it but without the job server:
            # every node of this simulation unpacks a job's working_dir into one shared folder, so
            # each node the autoscaler adds would delete the folder the driver runs in.
            driver = subprocess.run(
                [sys.executable, "jobs/tune.py", *sweep],
                cwd=ROOT,
                env={**c.env, "RAY_ADDRESS": c.address},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=900,
            )
            logs = driver.stdout
            assert driver.returncode == 0, logs[-8000:]
            swept = time.time()
            deadline = time.time() + 180
            while c.alive_workers() > 0:
                # (a node holding an actor never counts as idle: say which ones kept it)
                kept = [(a["class_name"], a["node_id"][-6:]) for a in c.actors(alive=True)]
                assert time.time() < deadline, f"worker nodes not removed: {sampler.changes()}, actors {kept}"
                time.sleep(1)
            while sampler.samples[-1][1] != 0:  # the sampler's own last look sees zero too
                assert time.time() < deadline, f"the sampler never saw zero: {sampler.changes()}"
                time.sleep(0.5)
        counts = [n for _, n in sampler.samples]
        print(
            f"\n[multinode] alive worker nodes over time (s, count), where it changed: {sampler.changes()}\n"
            f"[multinode] cluster up {up - start:.0f} s, sweep {swept - up:.0f} s, "
            f"scale-down {time.time() - swept:.0f} s, total {time.time() - start:.0f} s"
        )
        # 0 -> 2 (two trials at once, one worker node each) -> 0
        assert counts[0] == 0 and max(counts) == 2 and counts[-1] == 0, sampler.samples
    table = storage.fetch(f"s3://{BUCKET}/sweeps/scale/results.md").read_text()
    rows = json.loads(storage.fetch(f"s3://{BUCKET}/sweeps/scale/results.json").read_text())["rows"]
    assert [(r["label"], r["status"], r["step"]) for r in rows] == [
        (name, "finished", 2) for name in ("max_sub-off", "avg_sub-off")
    ], rows
    assert table.count("| finished |") == 2, table
    assert f"results: s3://{BUCKET}/sweeps/scale/results.md" in logs  # the driver's output says where it went


def _registered(run: str) -> str | None:
    """The checkpoint Ray Train registered last for a run (its public Result API), if any."""
    from ray.train import Result

    path, fs = storage.ray_storage(run)
    try:
        checkpoint = Result.from_path(path, storage_filesystem=fs).checkpoint
    except RuntimeError:  # no run folder or no checkpoint yet
        return None
    return Path(checkpoint.path).name if checkpoint else None


def _logs(cluster, submission_id: str, tries: int = 1) -> str:
    """A job's driver output, from the job server (one HTTP call, not a `ray job logs` process). A
    dashboard too busy to answer `tries` calls 2 s apart reads as no output yet when polling
    (tries=1); a final read passes more tries."""
    for attempt in range(tries):
        try:
            return cluster.get(f"/api/jobs/{submission_id}/logs")["logs"]
        except OSError:
            if attempt < tries - 1:
                time.sleep(2)
    return ""


def _job_state(cluster, submission_id: str) -> str:
    """The job server's status of a job (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); a dashboard
    too busy to answer one poll (a node dying) reads as UNKNOWN, and the caller polls again."""
    try:
        return cluster.job(submission_id)["status"]
    except OSError:
        return "UNKNOWN"


def _wait_for(cluster, job: str, pattern: str, deadline: float, after: int = 0) -> tuple[re.Match, int]:
    """The first match of `pattern` in the job's output from offset `after` on, polled until
    `deadline`, and where it ends; fails with the output's tail if the job ends or the deadline
    passes first."""
    while True:
        logs = _logs(cluster, job)
        if match := re.compile(pattern).search(logs, after):
            return match, match.end()
        state = _job_state(cluster, job)
        assert state not in ("FAILED", "STOPPED", "SUCCEEDED") and time.time() < deadline, (
            f"waited for {pattern!r}; job {state}:\n{logs[-8000:]}"
        )
        time.sleep(0.5)


def test_an_elastic_run_checkpoints_on_a_drain_notice_goes_on_with_fewer_workers_and_grows_back(
    cluster_factory, s3_bench, tmp_path, monkeypatch
):
    """A spot node's life: two training nodes, `num_workers: [1, 2]`. One node gets a drain notice
    (a spot preemption's warning) with a 15 s deadline: the run checkpoints at once; at the
    deadline the node goes and is not replaced: the run goes on with one worker from its last
    checkpoint (gradient accumulation 2 keeps the global batch). A node joins again: the run grows
    back to two workers and ends at its configured step. Every row it trained on, over all
    attempts, it trained once."""
    # a worker group Ray decides on from a resource view that still counts the lost node waits this
    # long for it (Ray's default: 60 s) before it decides again
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")
    node = {"CPU": 1, "train_node": 1}
    cluster = cluster_factory({"CPU": 0}, {"w1": node, "w2": node})
    runs = f"s3://{BUCKET}/runs"
    steps, every = 240, 10
    train = tiny_run(
        s3_bench,
        f"train.storage={runs}",
        "train.run_name=elastic",
        "train.num_workers=[1, 2]",
        "train.resize_check_s=5",
        "train.worker_resources={train_node: 1}",
        # a node has 1 CPU and its training worker 0.5: the decode tasks fit beside the workers
        "train.cpus_per_worker=0.5",
        "data.decode_cpus=0.4",
        f"train.steps={steps}",
        f"train.checkpoint_every={every}",
        "train.keep_checkpoints=1000",  # all of them: their rows make the run's whole record
        "train.record_batches=true",
        "train.log_every=2",
        "train.val_every=0",
        "data.val=null",
        "train.max_failures=4",
    )
    submit(cluster, "elastic", "jobs/train.py", *train, options=("--no-wait",))
    run = f"{runs}/elastic"
    deadline = time.time() + 900
    _, at = _wait_for(cluster, "elastic", r"step \d+/\d+ checkpoint saved", deadline)
    # the notice, for one of the two nodes with a worker
    victim_node = next(a["node_id"] for a in cluster.actors("RayTrainWorker", alive=True))
    victim = next(name for name, nid in cluster.node_ids.items() if nid == victim_node)
    cluster.ray(
        "drain-node", "--address", cluster.address, "--node-id", victim_node,
        "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot interruption",
        "--deadline-remaining-seconds", "15",
    )  # fmt: skip
    noticed = time.time()
    drained = r"step (\d+)/\d+ checkpoint saved \(a node of this run is being drained\)"
    at_notice, at = _wait_for(cluster, "elastic", drained, deadline, at)
    time.sleep(max(0.0, noticed + 15 - time.time()))
    cluster.remove_node(victim, graceful=False)  # the deadline passed: the cloud takes the node
    removed = time.time()
    one = r"on 1 CPU worker\(s\), ZeRO-2, resuming at step (\d+)[^\n]*checkpoint read: ([\d.]+) MiB on the busiest"
    _, at = _wait_for(cluster, "elastic", r"workers: 2 -> 1 \(workers lost and not replaced\)", deadline, at)
    shrunk, at = _wait_for(cluster, "elastic", one, deadline, at)
    shrunk_at = time.time()
    # it trains on one worker, to a checkpoint of its own, before a node joins again
    alone, at = _wait_for(cluster, "elastic", r"step (\d+)/\d+ checkpoint saved", deadline, at)
    cluster.add_node("w3", node)
    two = r"on 2 CPU worker\(s\), ZeRO-2, resuming at step (\d+)[^\n]*checkpoint read: ([\d.]+) MiB on the busiest"
    _, at = _wait_for(cluster, "elastic", r"workers: 1 -> 2 \(room for more workers\)", deadline, at)
    grown, at = _wait_for(cluster, "elastic", two, deadline, at)
    grown_at = time.time()
    while (state := _job_state(cluster, "elastic")) != "SUCCEEDED":
        assert state not in ("FAILED", "STOPPED") and time.time() < deadline, _logs(cluster, "elastic")[-8000:]
        time.sleep(1)
    logs = _logs(cluster, "elastic", tries=10)
    assert "resized from 2 to 1 workers: gradient accumulation 1 -> 2 keeps 8 pairs per step" in logs
    assert "resized from 1 to 2 workers: gradient accumulation 2 -> 1 keeps 8 pairs per step" in logs
    notice_step, shrunk_step, grown_step = int(at_notice.group(1)), int(shrunk.group(1)), int(grown.group(1))
    assert notice_step <= shrunk_step < int(alone.group(1)) <= grown_step < steps  # nothing before the notice lost
    final = json.loads(storage.read_bytes(f"{run}/step_{steps:08d}/train_state.json"))
    assert final["step"] == steps and final["world_size"] == 2
    # every row trained once over the attempts: the checkpoints' per-step rows (64 rows an epoch)
    import numpy as np

    names = sorted(set(re.findall(r"step_\d{8}", " ".join(storage.list_files(run)))))
    batches = [storage.read_bytes(f"{run}/{name}/data/batches.npy") for name in names]
    trained = np.concatenate([np.load(io.BytesIO(b), allow_pickle=False) for b in batches])
    assert sorted(set(trained[:, 0].tolist())) == list(range(1, steps + 1))
    assert len(trained) == steps * 8 and len(np.unique(trained[:, 2])) == len(trained)
    print(
        f"\n[multinode] drain notice -> checkpoint at step {notice_step}; node removed at the 15 s deadline; "
        f"1 worker from step {shrunk_step} {shrunk_at - removed:.0f} s later (read {shrunk.group(2)} MiB of the "
        f"checkpoint), trained to a checkpoint at {alone.group(1)}; node added, 2 workers from step {grown_step} "
        f"{grown_at - shrunk_at:.0f} s later (the busiest rank read {grown.group(2)} MiB)"
    )
