"""What every stage task shares: fingerprint-keyed caching, small JSON results, Prefect progress reporting.

Caching: a task's cache key is its stage's artifact path plus a file name, computed by the flow from the
configuration's fingerprints (``distill.plan``). Prefect's default policy includes the run id and so never hits
for a new scheduled run; ours hits whenever tonight's configuration equals yesterday's. The result (the stage's
manifest, as JSON) is stored under that key in the artifact store itself, inside the stage's directory: delete a
stage's artifacts and its Prefect cache entry goes with them, so a stale cache can never point at missing data;
withdraw a stage's completion marker, or one of its splits' (a repaired teacher cache), and the entry is withdrawn
too when the next run computes the key, so the stage runs again and redoes only what is missing.
"""

from __future__ import annotations

import logging
import time

from prefect import get_run_logger, task
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from distill.artifacts import stage_finished
from distill.config import load_config
from distill.plan import open_store
from distill.progress import Reporter


def stage_cache_key(_context, parameters: dict) -> str:
    """The stage's result file; withdrawn first when the stage's artifacts are no longer all finished (a split
    reopened by a repair, a marker deleted by hand), so that Prefect runs the task instead of returning a result
    that stands for missing data."""
    stage = parameters["stage"]
    store = open_store(load_config(parameters["config"]), check=False)  # the flow checked it before any stage
    if not stage_finished(store, stage["path"]):
        store.delete(stage["cache_key"])
    return stage["cache_key"]


def stage_task(name: str, **options):
    """``@task`` for a pipeline stage: cached by fingerprint, JSON result, nothing big kept in memory."""
    return task(name=name, cache_key_fn=stage_cache_key, persist_result=True, result_serializer="json",
                cache_result_in_memory=False, **options)


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
