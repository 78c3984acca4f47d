"""Progress of a stage in the Prefect UI: a progress artifact beside the terminal's progress bar, and the stage's
messages in the task run's log."""

from __future__ import annotations

import logging
import time

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError

from distill.progress import Reporter


def _in_run() -> bool:
    try:
        get_run_context()
        return True
    except MissingContextError:
        return False


class PrefectReporter(Reporter):
    """The terminal progress bar, plus a progress artifact in the Prefect UI and logs in the run's logger."""

    def __init__(self, min_interval: float = 2.0):
        super().__init__()
        self.min_interval = min_interval
        self._artifact = None
        self._done = self._total = 0
        self._last = 0.0

    def start(self, total: int | None, description: str, initial: int = 0) -> None:
        super().start(total, description, initial)
        self._done, self._total, self._last = initial, max(total or 0, 1), time.monotonic()
        if total and _in_run():  # an unknown total has no percentage to show
            self._artifact = create_progress_artifact(progress=100.0 * initial / self._total, description=description)

    def advance(self, n: int = 1, **metrics: float) -> None:
        super().advance(n, **metrics)
        self._done += n
        if self._artifact is not None and time.monotonic() - self._last >= self.min_interval:
            update_progress_artifact(self._artifact, progress=min(100.0, 100.0 * self._done / self._total))
            self._last = time.monotonic()

    def log(self, message: str, level: int = logging.INFO) -> None:
        if _in_run():
            get_run_logger().log(level, message)
        else:  # called outside a run (e.g. ``task.fn(...)``): the terminal will do
            super().log(message, level)

    def close(self) -> None:
        if self._artifact is not None:
            update_progress_artifact(self._artifact, progress=min(100.0, 100.0 * self._done / self._total))
            self._artifact = None
        super().close()
