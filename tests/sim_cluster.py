"""A multi-node Ray cluster on one machine, for tests: Ray's own `cluster_utils.Cluster` (a head and
worker nodes, each with its own resources; nodes added and removed on demand) or
`cluster_utils.AutoscalingCluster` (Ray's fake multi-node autoscaler launches and removes nodes).
The head runs the dashboard's job server and token authentication is on, as on a real cluster.

Nothing here joins the cluster from the test process. The cluster runs in processes of its own,
under a Ray temp dir of its own (so a `ray.init()` elsewhere on the machine never finds it), and a
test reaches it as a user does: the `ray` CLI (`ray job submit`, `ray job status`, ...) and the
dashboard's HTTP API, both given the cluster's token. The test session's in-process Ray
(`ray_local`) is never touched, whether it is up or not.

    with start_cluster({"CPU": 0}, {"w1": {"CPU": 1, "gpu_node": 1}, "w2": {...}}, tmp) as cluster:
        cluster.ray("job", "submit", "--address", cluster.dashboard, "--", "python", "x.py")
        cluster.remove_node("w1")                        # a whole node gone, its processes killed
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent  # the venv's `ray` and `python`: the nodes run the same Python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_env(temp: str, token: str) -> dict[str, str]:
    """The environment of every process of the cluster, and of the CLI calls that reach it. The
    nodes inherit the caller's environment (the S3 endpoint and keys, as a real node gets them from
    its image or instance role) minus any Ray address."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(
        RAY_TMPDIR=temp,  # session dirs and the "current cluster" file of this cluster only
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # job entrypoints say `python`
        PYTHONWARNINGS="ignore",
    )
    return env


class SimCluster:
    """A running simulated cluster: its addresses, the `ray` CLI and the HTTP API with its token,
    and (for a static cluster) nodes added and removed by name."""

    def __init__(self, address: str, dashboard: str, env: dict[str, str], token: str, temp: str, log: Path):
        self.address = address  # GCS host:port, what a driver's RAY_ADDRESS would be
        self.dashboard = dashboard  # http://127.0.0.1:PORT: the job server (`ray job submit --address`)
        self.env = env  # the environment of CLI calls: RAY_AUTH_MODE=token, the token (or its file), ...
        self.token = token
        self.temp = temp
        self.log = log  # the cluster's own output (node start-up, autoscaler)
        self.node_ids: dict[str, str] = {}  # name -> node id, for nodes this object started by name

    # ------------------------------------------------------------------ reaching it as a user

    def ray(self, *args: str, timeout: float = 600, check: bool = True, cwd: str | Path | None = None):
        """Run the `ray` CLI against this cluster; returns the CompletedProcess (stdout + stderr
        merged into stdout). `check`: fail with the output when the command fails."""
        out = subprocess.run(
            [str(BIN / "ray"), *args],
            env=self.env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"ray {' '.join(args[:3])} ... exited {out.returncode}:\n{out.stdout[-6000:]}")
        return out

    def get(self, path: str, token: str | None = None) -> dict:
        """GET a dashboard API path (with the cluster's token, or `token`) -> the decoded JSON."""
        request = urllib.request.Request(
            self.dashboard + path, headers={"Authorization": f"Bearer {token or self.token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def nodes(self) -> list[dict]:
        """Every node the cluster has known (Ray's state API): node_id, node_name, state (ALIVE or
        DEAD), is_head_node, resources_total."""
        return self.get("/api/v0/nodes?limit=1000&detail=true")["data"]["result"]["result"]

    def alive_workers(self) -> int:
        return sum(n["state"] == "ALIVE" and not n["is_head_node"] for n in self.nodes())

    def actors(self, class_name: str | None = None, alive: bool = False) -> list[dict]:
        """Actors (of a class; alive ones only), each with the node_id it runs or ran on."""
        filters = ([("class_name", class_name)] if class_name else []) + ([("state", "ALIVE")] if alive else [])
        query = "".join(f"&filter_keys={k}&filter_predicates=%3D&filter_values={v}" for k, v in filters)
        return self.get(f"/api/v0/actors?limit=1000&detail=true{query}")["data"]["result"]["result"]

    def job(self, submission_id: str) -> dict:
        """The job server's record of a job: status, driver_node_id, message, ..."""
        return self.get(f"/api/jobs/{submission_id}")

    # ------------------------------------------------------------------ nodes (static clusters)

    def add_node(self, name: str, resources: dict[str, float]) -> str:
        raise NotImplementedError("the autoscaler adds this cluster's nodes")

    def remove_node(self, name: str, graceful: bool = True) -> None:
        raise NotImplementedError("the autoscaler removes this cluster's nodes")

    def shutdown(self) -> None:
        raise NotImplementedError


def _node_args(name: str, resources: dict[str, float]) -> dict:
    """`Cluster.add_node` arguments for a node with these resources ("CPU", "GPU", custom ones)."""
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    return {
        "num_cpus": resources.get("CPU", 0),
        "num_gpus": resources.get("GPU", 0),
        "resources": custom,
        "node_name": name,
        "object_store_memory": 150 * 1024**2,
        # Each node unpacks a job's working_dir in a folder of its own, as on its own disk: in a
        # shared one, a node setting up the job deletes and rewrites the folder that processes on
        # other nodes (the job's driver) are running in.
        "runtime_env_dir_name": f"runtime_resources_{name}",
    }


class _StaticCluster(SimCluster):
    """`ray.cluster_utils.Cluster` driven by a controller process (`python -m tests.sim_cluster`)
    that reads one JSON command per line and answers one JSON line."""

    def __init__(self, proc: subprocess.Popen, ready: dict, env: dict[str, str], temp: str, log: Path):
        super().__init__(ready["address"], ready["dashboard"], env, env["RAY_AUTH_TOKEN"], temp, log)
        self._proc = proc
        self.node_ids.update(ready["nodes"])

    def _call(self, **command) -> dict:
        if self._proc.poll() is not None:
            raise AssertionError(f"the cluster controller exited ({self._proc.returncode}); see {self.log}")
        self._proc.stdin.write(json.dumps(command) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise AssertionError(f"the cluster controller exited; see {self.log}")
        answer = json.loads(line)
        if "error" in answer:
            raise AssertionError(f"{command['op']} {command.get('name', '')}: {answer['error']}")
        return answer

    def add_node(self, name: str, resources: dict[str, float]) -> str:
        """Start a worker node named `name` with these resources; returns its node id."""
        self.node_ids[name] = self._call(op="add_node", name=name, args=_node_args(name, resources))["node_id"]
        return self.node_ids[name]

    def remove_node(self, name: str, graceful: bool = True) -> None:
        """`Cluster.remove_node`: every process of the node is killed (gracefully first, or at
        once with graceful=False), as when a machine is lost."""
        self._call(op="remove_node", name=name, graceful=graceful)

    def shutdown(self) -> None:
        with contextlib.suppress(AssertionError, OSError, ValueError):
            self._call(op="shutdown")
        _reap(self._proc)


def _reap(proc: subprocess.Popen, grace: float = 3) -> None:
    """End `proc` and every process it started: its process group (start_new_session below) and
    every descendant alive now, job drivers included (Ray starts those in sessions of their own).
    SIGTERM to all of them at once (Ray's processes exit on it), then SIGKILL to what is left."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for child in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(sig)
        if sig == signal.SIGTERM:
            psutil.wait_procs(family, timeout=grace)
    proc.wait()


def _temp_dir() -> str:
    # Short: Ray's socket paths live under it and a Unix socket path has at most 107 bytes.
    return tempfile.mkdtemp(prefix="rsim", dir="/tmp")


@contextlib.contextmanager
def start_cluster(head: dict[str, float], workers: dict[str, dict[str, float]], log_dir: Path):
    """A head with `head` resources (dashboard and job server on) and one worker node per entry of
    `workers` (name -> resources, e.g. {"CPU": 1, "gpu_node": 1}), all up when this yields the
    SimCluster. Everything it started is ended on exit."""
    temp, token = _temp_dir(), secrets.token_hex(32)
    env = _cluster_env(temp, token)
    log = Path(log_dir) / "cluster.log"
    spec = {
        "head": {
            **_node_args("head", head),
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
            "dashboard_agent_listen_port": free_port(),  # not Ray's fixed default: another Ray may hold it
        },
        "workers": {name: _node_args(name, res) for name, res in workers.items()},
    }
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.sim_cluster", json.dumps(spec)],
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
        )
    cluster = None
    try:
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=30)
            raise AssertionError(f"the cluster did not start:\n{log.read_text()[-6000:]}")
        cluster = _StaticCluster(proc, json.loads(line), env, temp, log)
        yield cluster
    finally:
        if cluster is not None:
            cluster.shutdown()
        else:
            _reap(proc)
        shutil.rmtree(temp, ignore_errors=True)


# ---------------------------------------------------------------------- autoscaling cluster


def _autoscaling_cluster_class():
    from ray.cluster_utils import AutoscalingCluster

    class OwnAutoscalingCluster(AutoscalingCluster):
        """Ray's AutoscalingCluster with two changes. Its base config comes from here: the pip
        wheel lacks fake_multi_node/example.yaml, which the parent reads. And it never runs `ray
        stop --force`, which ends every Ray on the machine (the test session's own, anyone's):
        its head is one `ray start --head --block` process whose process group is ended on exit."""

        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            config = {
                "cluster_name": "fake_multinode",
                "max_workers": sum(t.get("max_workers", 0) for t in worker_node_types.values()),
                "provider": {
                    "type": "fake_multinode",
                    "use_node_id_as_ip": True,
                    "disable_node_updaters": True,
                    "disable_launch_config_check": True,
                },
                "available_node_types": {
                    **worker_node_types,
                    "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0},
                },
                "head_node_type": "ray.head.default",
                "auth": {},
                "docker": {},
                "upscaling_speed": 1.0,
                "idle_timeout_minutes": 0.1,
                **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands")},
                **{key: [] for key in ("worker_setup_commands", "head_start_ray_commands")},
                **{key: [] for key in ("worker_start_ray_commands", "cluster_synced_files")},
                **{key: [] for key in ("rsync_exclude", "rsync_filter")},
                "file_mounts": {},
                "file_mounts_sync_continuously": False,
            }
            config.update(config_kwargs)
            return config

        def start(self, _system_config=None, override_env=None):
            raise NotImplementedError("use start_autoscaling_cluster")

        def shutdown(self):
            raise NotImplementedError("use start_autoscaling_cluster")

    return OwnAutoscalingCluster


@contextlib.contextmanager
def start_autoscaling_cluster(
    head: dict[str, float], worker_types: dict[str, dict], log_dir: Path, idle_timeout_minutes: float = 0.1
):
    """A head with `head` resources and Ray's fake multi-node autoscaler, which launches worker
    nodes of `worker_types` (Ray's available_node_types: resources, min_workers, max_workers) when
    work waits for them and removes them after `idle_timeout_minutes` idle."""
    from ray._private.services import get_node_ip_address

    temp, token = _temp_dir(), secrets.token_hex(32)
    env = _cluster_env(temp, token)
    env.update(AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1")  # as AutoscalingCluster.start
    port, dashboard_port = free_port(), free_port()
    types = {name: {"node_config": {}, **spec} for name, spec in worker_types.items()}
    cluster = _autoscaling_cluster_class()(dict(head), types, idle_timeout_minutes=idle_timeout_minutes)
    # Launched nodes join this head (the provider's default is port 6379 on this machine).
    cluster._config["provider"]["gcs_address"] = f"{get_node_ip_address()}:{port}"
    config = Path(log_dir) / "autoscaling.json"
    config.write_text(json.dumps(cluster._config))
    custom = {k: v for k, v in head.items() if k not in ("CPU", "GPU")}
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--autoscaling-config={config}",
        f"--port={port}",
        f"--num-cpus={head.get('CPU', 0)}",
        f"--num-gpus={head.get('GPU', 0)}",
        f"--resources={json.dumps(custom)}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--object-store-memory=157286400",
        "--disable-usage-stats",
    ]
    log = Path(log_dir) / "cluster.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    sim = SimCluster(f"{get_node_ip_address()}:{port}", f"http://127.0.0.1:{dashboard_port}", env, token, temp, log)
    try:
        _wait_for_dashboard(sim, proc)
        yield sim
    finally:
        _reap(proc)
        shutil.rmtree(temp, ignore_errors=True)


# ---------------------------------------------------------------------- a launcher's start commands


@contextlib.contextmanager
def start_from_commands(head_command: str, worker_command: str, log_dir: Path):
    """A cluster launcher's `ray start` lines (the head's and a worker's, as `ray up` runs them on
    each node) run on this machine, each as its own node. The nodes get only a token file, as the
    launcher's file mount gives every node ~/.ray/auth_token, and whatever the lines themselves
    set: no RAY_AUTH_MODE or RAY_AUTH_TOKEN from here. Ports, and the options that need the cloud
    (the autoscaling config) or a machine per node (fixed ports), are made local; see `_local`.
    The SimCluster's CLI calls have the token file and RAY_AUTH_MODE=token, as the README's shell."""
    from ray._private.services import get_node_ip_address

    temp, token = _temp_dir(), secrets.token_hex(32)
    token_file = Path(temp) / "auth_token"
    token_file.write_text(token)
    node_env = _cluster_env(temp, token)
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        node_env.pop(key)
    node_env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    port, dashboard_port = free_port(), free_port()
    head_address = f"{get_node_ip_address()}:{port}"
    head = _local(head_command, head_address) + [
        "--num-cpus=0",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
    ]
    worker = _local(worker_command, head_address) + ["--num-cpus=1"]
    client_env = {**node_env, "RAY_AUTH_MODE": "token"}  # and the token file, as the README's shell
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    sim = SimCluster(head_address, dashboard, client_env, token, temp, Path(log_dir) / "head.log")
    sim.procs = {}  # "head", "worker" -> the `ray start --block` process of that node
    try:
        for name, words in (("head", head), ("worker", worker)):
            with open(Path(log_dir) / f"{name}.log", "w") as out:
                sim.procs[name] = subprocess.Popen(
                    ["bash", "-c", " ".join(words)],
                    env=node_env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if name == "head":
                _wait_for_dashboard(sim, sim.procs[name])
        yield sim
    finally:
        for proc in sim.procs.values():
            _reap(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _local(command: str, head_address: str) -> list[str]:
    """A launcher's `ray start` line for a node on this machine: the head's port becomes a free one,
    $RAY_HEAD_IP:6379 the head's address, options that need the cloud or a machine of their own
    (--autoscaling-config, --object-manager-port, --dashboard-host) go, and it blocks (so that
    ending the process ends the node)."""
    words = []
    for word in command.replace("$RAY_HEAD_IP:6379", head_address).split():
        if word.startswith("--port="):
            word = f"--port={head_address.rsplit(':', 1)[1]}"
        if not word.startswith(("--autoscaling-config", "--object-manager-port", "--dashboard-host")):
            words.append(word)
    return [*words, "--block", "--disable-usage-stats"]


def _wait_for_dashboard(sim: SimCluster, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if sim.nodes():
                return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"the head did not come up:\n{sim.log.read_text()[-6000:]}")
        time.sleep(0.5)


# ---------------------------------------------------------------------- the controller process


def _serve(spec: dict) -> None:
    """Start the cluster, answer with its addresses, then serve add/remove/shutdown commands."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever Ray or its children print goes to the log, not into the answers
    from ray.cluster_utils import Cluster

    cluster = Cluster()
    nodes = {"head": cluster.add_node(**spec["head"])}
    for name, args in spec["workers"].items():
        nodes[name] = cluster.add_node(**args)
    cluster.wait_for_nodes()
    head = nodes["head"]
    answers.write(
        json.dumps(
            {
                "address": head.gcs_address,
                "dashboard": f"http://{head.webui_url}",
                "nodes": {name: node.node_id for name, node in nodes.items()},
            }
        )
        + "\n"
    )
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command["op"] == "shutdown":
                break
            if command["op"] == "add_node":
                node = nodes[command["name"]] = cluster.add_node(**command["args"])
                answers.write(json.dumps({"node_id": node.node_id}) + "\n")
            elif command["op"] == "remove_node":
                cluster.remove_node(nodes.pop(command["name"]), allow_graceful=command["graceful"])
                answers.write(json.dumps({"ok": True}) + "\n")
            else:
                answers.write(json.dumps({"error": f"unknown op {command['op']!r}"}) + "\n")
        except Exception as err:  # the test sees it as an assertion with the reason
            answers.write(json.dumps({"error": f"{type(err).__name__}: {err}"}) + "\n")
    cluster.shutdown()
    answers.write(json.dumps({"ok": True}) + "\n")


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
