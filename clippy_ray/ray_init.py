"""Connect to Ray the same way everywhere: the cluster in RAY_ADDRESS (as `ray job submit` sets),
or a local one. Quiet by default: Ray's own logging goes wherever the root logger goes (the run's
log file, see `console.run_logs`), workers' output stays in Ray's log files, no Ray Data bars."""

from __future__ import annotations

import logging
import os
import re


def init_ray(num_cpus: int | None = None, verbose: bool = False) -> None:
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        return
    # Ray's import-time handler prints straight to stderr (the token-authentication notice on every
    # start, for one); hand its records to the root logger instead.
    ray_logger = logging.getLogger("ray")
    if not verbose:
        ray_logger.handlers = []
        ray_logger.propagate = True  # else logging's last-resort handler prints its warnings anyway
    kwargs: dict = {
        "log_to_driver": verbose,
        "configure_logging": verbose,
        "logging_level": "INFO" if verbose else "WARNING",
    }
    if os.environ.get("RAY_ADDRESS"):
        kwargs["address"] = os.environ["RAY_ADDRESS"]
    else:
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)
    ray.init(**kwargs)
    if not verbose:
        ray_logger.handlers = []
        ray_logger.propagate = True
    driver_messages_to_log(not verbose)
    if not verbose:
        _ray_data_console_off()
    # Datasets copy this context when they are made, so the bars stay off in Ray's own actors too.
    DataContext.get_current().enable_progress_bars = verbose


def _ray_data_console_off() -> None:
    """Ray Data gives its logger a console handler of its own at import (every dataset's "Starting
    execution of ..." and "Execution plan ..." lines, a warning that the bars are off). Drop it: its
    file handler keeps writing `ray-data.log` in Ray's session logs, which the run folder gets."""
    from ray._private.log import PlainRayHandler

    data_logger = logging.getLogger("ray.data")
    data_logger.handlers = [h for h in data_logger.handlers if not isinstance(h, PlainRayHandler)]


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def driver_messages_to_log(enable: bool = True) -> None:
    """Ray prints what the raylet pushes to the driver (its "N worker processes have been started"
    warning, with colour codes; out-of-memory kills, which also fail the task) straight to stdout,
    whatever `log_to_driver` says. Send those lines, without colour codes, to Ray's logger instead:
    the console hands it to the run's log file. `enable=False` (--verbose) puts Ray's printing back.
    (Ray's own hook, `ray._private.worker.print_to_stdstream`; with `log_to_driver` off, nothing
    else goes through it on the driver.)"""
    import ray._private.worker as ray_worker

    current = ray_worker.print_to_stdstream
    original = getattr(current, "clippy_ray_original", current)
    if not enable:
        ray_worker.print_to_stdstream = original
        return
    if current is not original:
        return
    logger = logging.getLogger("ray")

    def to_log(data: dict, ignore_prefix: bool = False) -> None:
        for line in data.get("lines", []):
            logger.warning("(%s) %s", data.get("pid", "ray"), ANSI.sub("", line))

    to_log.clippy_ray_original = original
    ray_worker.print_to_stdstream = to_log
