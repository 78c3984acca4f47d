"""Where each artifact lives under the store root.

    <stage>/<fp>/                  a stage whose output runs share (tokenize, teacher_cache), by fingerprint
    runs/<run>/<stage>-<fp>/       a run's own stages (training, lm_head, evaluate, export); ``<fp>`` shortened
    runs/<run>/<stage>-<fp>/checkpoints/step-<n>/   a training stage's checkpoints
    locks/<path>/                  the lock of the stage being written at ``<path>`` (outside it: a stage may
                                   delete its own debris, never its lock)
    prefect/<path>.json            Prefect's cached result of the stage at ``<path>``; prefect/<id>: the records
                                   Prefect keeps of failed tasks

An identical configuration has identical fingerprints, so it finds yesterday's artifacts; a run is named by its
training stage's fingerprint, and every stage after it carries its own in its directory name, so that changing
only ``head.*`` or ``eval.*`` writes beside the earlier results instead of finding them complete.
"""

from __future__ import annotations

import re

from .store import clean_path

_STEP_DIR = re.compile(r"^step-(\d+)$")
SHORT_FINGERPRINT = 10  # hex digits of a fingerprint in a name: 40 bits, no collision among one run's variants
PREFECT_RESULTS = "prefect"


def _name(value: str, what: str) -> str:
    """A path component (or a relative path) that cannot escape its parent."""
    cleaned = clean_path(value) if value else ""
    if not cleaned:
        raise ValueError(f"{what} must be a non-empty name, got {value!r}")
    return cleaned


def short(fingerprint: str) -> str:
    return _name(fingerprint, "a fingerprint")[:SHORT_FINGERPRINT]


def shared_stage_dir(stage: str, fingerprint: str) -> str:
    return f"{_name(stage, 'a stage name')}/{_name(fingerprint, 'a fingerprint')}"


def run_stage_dir(run: str, stage: str, fingerprint: str) -> str:
    return f"runs/{_name(run, 'a run name')}/{_name(stage, 'a stage name')}-{short(fingerprint)}"


def lock_dir(artifact: str) -> str:
    """Where the lock guarding the build of the artifact at ``artifact`` lives."""
    return f"locks/{_name(artifact, 'an artifact path')}"


def prefect_result(artifact: str) -> str:
    """Prefect's cached result of the stage at ``artifact``, relative to the result storage (``prefect/``)."""
    return f"{_name(artifact, 'an artifact path')}.json"


def checkpoints_dir(stage_dir: str) -> str:
    return f"{_name(stage_dir, 'a stage directory')}/checkpoints"


def checkpoint_dir(directory: str, step: int) -> str:
    """Checkpoint ``step`` under the checkpoints ``directory``."""
    if int(step) < 0:
        raise ValueError(f"a checkpoint step must be >= 0, got {step}")
    return f"{_name(directory, 'a checkpoints directory')}/step-{int(step)}"


def checkpoint_step(name: str) -> int | None:
    """The step of a ``step-<n>`` directory name (or path), None for anything else."""
    match = _STEP_DIR.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None
