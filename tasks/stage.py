"""The one Prefect task: a stage of a planned run.

Its cache key is the stage's directory, which its fingerprint names, so a nightly run whose configuration equals
yesterday's finds every stage cached (Prefect's default policy hashes the run id and would never hit). The key
function is pure; that a cached result still stands for finished artifacts is the flow's to know: a stage that the
plan found unfinished (a repaired cache, a deleted marker) runs with ``refresh_cache``, so Prefect never returns a
result for artifacts that are no longer there.
"""

from __future__ import annotations

from prefect import task
from prefect.utilities.annotations import quote

from distill.plan import Run
from distill.stage import Manifest, execute
from distill.stages import STAGES
from storage import layout

from .progress import PrefectReporter


def _result_key(_context, parameters: dict) -> str:
    run = parameters["run"]
    run = run.unquote() if isinstance(run, quote) else run
    return layout.prefect_result(run.stages[parameters["name"]].path)


@task(persist_result=True, result_serializer="json", cache_result_in_memory=False, cache_key_fn=_result_key)
def stage_task(run: Run, name: str, inputs: dict[str, Manifest | None]) -> Manifest:
    return execute(STAGES[name], run.context(name, PrefectReporter()), **inputs)


def run_stage(run: Run, name: str, *, finished: bool, result_storage, **inputs: Manifest | None) -> Manifest:
    """Stage ``name`` of ``run`` as a task named after it. ``run`` travels quoted: Prefect passes it as it is,
    without rebuilding (and so re-validating) its configuration."""
    task_ = stage_task.with_options(name=name, result_storage=result_storage, refresh_cache=not finished)
    return task_(quote(run), name, inputs)
