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

import hashlib
import logging
import re
import time

from prefect import get_run_logger, task
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.filesystems import LocalFileSystem, RemoteFileSystem

from distill.artifacts import stage_finished
from distill.config import load_config
from distill.plan import open_store
from distill.progress import Reporter
from storage import ArtifactStore


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


SECRETS = ("key", "secret", "token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token")

# Prefect persists a failed task's exception too, under a random key (a uuid4's hex digits) at the top of the result
# storage, where every cache key is a stage's path; the artifact root's blocks keep those records in one folder.
FAILED_RESULTS = "prefect-failures"
_RANDOM_KEY = re.compile(r"[0-9a-f]{32}")


class _FailuresInOneFolder:
    def _resolve_path(self, path):
        if path is not None and _RANDOM_KEY.fullmatch(str(path)):
            path = f"{FAILED_RESULTS}/{path}"
        return super()._resolve_path(path)


class LocalArtifactRoot(_FailuresInOneFolder, LocalFileSystem):
    """Prefect's ``LocalFileSystem`` over a local artifact root, failed tasks' records under ``prefect-failures/``."""

    _block_type_name = "bitnet-distill Local Artifact Root"


class RemoteArtifactRoot(_FailuresInOneFolder, RemoteFileSystem):
    """Prefect's ``RemoteFileSystem`` over an ``s3://`` (any fsspec) root, failed tasks' records under
    ``prefect-failures/``."""

    _block_type_name = "bitnet-distill Remote Artifact Root"


def result_storage(store: ArtifactStore):
    """A Prefect filesystem block over the artifact store's root (a local path or ``s3://``).

    Prefect needs cached results' storage saved server-side, so the block is saved under a name derived from the
    root. It takes the store's S3 options as s3fs takes them (``region`` and the AWS aliases normalised, the
    endpoint and region from the environment included); credentials are left out of it (they would sit in the
    server's database): s3fs reads them from the standard AWS environment variables of whichever process runs the
    flow.
    """
    if store.is_local:
        block = LocalArtifactRoot(basepath=store.root)
    else:
        options = {k: v for k, v in store.storage_options.items() if k not in SECRETS}
        if "client_kwargs" in options:
            options["client_kwargs"] = {k: v for k, v in options["client_kwargs"].items() if k not in SECRETS}
        block = RemoteArtifactRoot(basepath=store.root, settings=options)
    name = "bitnet-distill-results-" + hashlib.sha256(store.root.encode()).hexdigest()[:12]
    block.save(name, overwrite=True)
    return block


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
