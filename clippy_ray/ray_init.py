"""Connect to Ray the same way everywhere: the cluster in RAY_ADDRESS (as `ray job submit` sets),
or a local one."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None, quiet: bool = False) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {"log_to_driver": not quiet, "configure_logging": True, "logging_level": "WARNING"}
    if os.environ.get("RAY_ADDRESS"):
        kwargs["address"] = os.environ["RAY_ADDRESS"]
    else:
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)
    ray.init(**kwargs)
    if quiet:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
