"""What a person sees: without a TTY one line per event, with a TTY live progress bars; library
chatter (Ray, Ray Data, warnings) goes to a log file in the run folder instead of the console.

Training progress is made on the rank-0 worker and shown by the driver: the worker puts events on
a Ray queue (`EventQueue`), a driver thread renders them (`Console`). Worker stdout is not
forwarded to the console (`ray.init(log_to_driver=False)` unless --verbose), so nothing is printed
twice and no Ray prefixes or colour codes reach it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

PREFIX = "[clippy-ray]"
LOG_NAME = "clippy-ray.log"


class Console:
    """Lines and bars on stdout. A bar exists only on a TTY; lines always print (above the bar)."""

    def __init__(self, stream=None, tty: bool | None = None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self._bars: dict[str, object] = {}

    def line(self, text: str) -> None:
        text = f"{PREFIX} {text}"
        if self._bars:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def progress(self, name: str, done: int, total: int, status: str = "") -> None:
        """Move bar `name` to `done` of `total` (TTY only; without a TTY, callers print lines)."""
        if not self.tty:
            return
        bar = self._bars.get(name)
        if bar is None:
            from tqdm import tqdm

            bar = self._bars[name] = tqdm(
                total=total,
                initial=done,
                desc=name,
                file=self.stream,
                dynamic_ncols=True,
                leave=False,
                bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining}{postfix}",
            )
        bar.n = done
        bar.set_postfix_str(status, refresh=False)
        bar.refresh()

    def counter(self, name: str, unit: str) -> Callable[[int, int], None]:
        """A `(done, total)` callback: a bar on a TTY, else a line at every tenth of the way."""
        start = time.time()

        def update(done: int, total: int) -> None:
            if self.tty:
                self.progress(name, done, total)
                if done == total:
                    self.close(name)
            elif done == total or done % max(1, total // 10) == 0:
                self.line(f"{name}: {done}/{total} {unit} ({time.time() - start:.0f} s)")

        return update

    def close(self, name: str) -> None:
        bar = self._bars.pop(name, None)
        if bar is not None:
            bar.close()


# ------------------------------------------------------------------------ training events


class EventQueue:
    """Events from the rank-0 training worker to the driver's console. Created on the driver;
    the handle travels to the workers in the loop config; `pump()` renders until `stop()`."""

    def __init__(self, console: Console):
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.console = console
        # num_cpus=0: the queue must never wait for a CPU that Ray Data or a worker holds. Pinned to
        # the driver's node: left to the scheduler it can land on a training node, and the loss of
        # that node would then take the run's progress channel (and the run) with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clippy-ray-events", daemon=True)

    def __enter__(self) -> EventQueue:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._drain(block=False)
        self.console.close("train")
        import ray

        ray.kill(self.queue.actor)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=True)

    def _drain(self, block: bool) -> None:
        from ray.exceptions import RayError
        from ray.util.queue import Empty

        try:
            events = [self.queue.get(timeout=0.5)] if block else []
            events += self.queue.get_nowait_batch(self.queue.qsize())
        except (Empty, RayError):  # nothing yet, or the queue is gone (shutdown): nothing to show
            return
        for event in events:
            render(self.console, event)


def render(console: Console, event: dict) -> None:
    """One event from the training loop: {kind: start|step|val|done, text, step, total, status}."""
    kind = event.get("kind")
    if kind == "step":
        if console.tty:
            console.progress("train", event["step"], event["total"], event.get("status", ""))
        else:
            console.line(event["text"])
    else:
        if kind == "done":
            console.close("train")
        console.line(event["text"])


def emitter(queue):
    """The worker side: a function that sends one event; prints it when there is no queue (a Tune
    trial, where the trial's own log is the place) or when the driver's queue is gone."""

    def show(event: dict) -> None:
        print(f"{PREFIX} {event['text']}", flush=True)

    if queue is None:
        return show

    def send(event: dict) -> None:
        from ray.exceptions import RayError

        try:
            queue.put(event)
        except RayError:  # the driver's queue is gone: the event goes to the worker's log instead
            show(event)

    return send


# ------------------------------------------------------------------------ logs and Ray's chatter


def _file_handler(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


@contextlib.contextmanager
def run_logs(folder: str | None, verbose: bool = False):
    """Send library logging and warnings to `<folder>/logs/clippy-ray.log` (quiet console) and,
    at the end, copy the logs of the Ray instance this process started into `<folder>/logs/ray/`.
    `folder` may be s3://: the logs are written in the local cache and uploaded at the end.
    Yields the local log folder."""
    from clippy_ray import storage

    if folder is None:
        local = storage.cache_dir() / "logs" / time.strftime("%Y%m%d-%H%M%S")
    elif storage.is_s3(folder):
        local = storage.cache_dir() / "logs" / folder.replace("://", "/").strip("/")
    else:
        local = Path(folder) / "logs"
    local.mkdir(parents=True, exist_ok=True)
    handler = _file_handler(local / LOG_NAME)
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    root.handlers = [handler] + ([logging.StreamHandler()] if verbose else [])
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # library warnings: into the file, not onto the console
    try:
        yield local
    finally:
        _copy_ray_logs(local / "ray")
        root.handlers = saved_handlers
        root.setLevel(saved_level)
        handler.close()
        logging.captureWarnings(False)
        if folder is not None and storage.is_s3(folder):
            storage.upload(local, storage.join(folder, "logs"))


def _copy_ray_logs(dest: Path) -> None:
    """The session logs of a Ray instance this process started (a cluster's stay on its nodes)."""
    try:
        import ray

        node = ray._private.worker.global_worker.node  # noqa: SLF001 - no public accessor for the logs dir
        if node is None or not getattr(node, "head", False) or os.environ.get("RAY_ADDRESS"):
            return
        shutil.copytree(
            node.get_logs_dir_path(), dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock", "events")
        )
    except Exception:  # noqa: BLE001 - logs are a courtesy; never fail a finished run over them
        logging.getLogger(__name__).exception("could not copy Ray's logs")
