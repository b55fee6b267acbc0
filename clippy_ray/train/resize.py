"""One console line per change in the number of training workers (`train.num_workers: [min, max]`):
Ray Train's controller decides each worker group's size; this callback runs in the controller and
sends the line to the driver's console.

`ControllerCallback` is a DeveloperAPI of Ray Train v2 (`ray.train.v2._internal.execution.callback`);
pyproject pins the Ray versions it was tested with."""

from __future__ import annotations

import logging

from ray.train.v2._internal.execution.callback import ControllerCallback

from clippy_ray.console import emitter

logger = logging.getLogger(__name__)


class WorkerCountLines(ControllerCallback):
    """Says, at each start of the worker group after the first, how many workers it has now."""

    def __init__(self, events, total_steps: int):
        self.events = events  # the driver's event queue (None: print into the controller's log)
        self.total = total_steps
        self.workers: int | None = None

    def before_controller_execute_resize_decision(self, resize_decision) -> None:
        try:  # a failing callback would fail the run: a console line is not worth that
            workers = resize_decision.num_workers
            if self.workers is not None and workers != self.workers:
                why = "room for more workers" if workers > self.workers else "workers lost and not replaced"
                text = (
                    f"workers: {self.workers} -> {workers} ({why}); the run goes on from its last checkpoint "
                    "with the same global batch"
                )
                emitter(self.events)({"kind": "start", "text": text, "step": 0, "total": self.total, "status": ""})
            self.workers = workers
        except Exception:  # noqa: BLE001
            logger.warning("could not report the worker count", exc_info=True)
