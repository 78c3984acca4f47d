"""Where each artifact lives under the store root. Shared artifacts are content-addressed by fingerprint, so an
identical configuration finds yesterday's tokens and cache; a run's own artifacts live under its name.

    tokens/<fp>/                      token shards (train/ and eval/ splits)
    teacher-cache/<fp>/               the Zarr teacher cache (one group per split)
    runs/<run>/checkpoints/step-<n>/  training checkpoints
    runs/<run>/train/                 the trained weights
    runs/<run>/lm-head-<fp>/          superposition: the retrained head (and its checkpoints/)
    runs/<run>/eval-<fp>/             evaluation report and metrics
    runs/<run>/student-<fp>/          the exported student
    locks/<artifact>/                 the lock of a shared artifact being built (outside it: a build starts by
                                      deleting the artifact's debris, and must not delete its own lock)

A run is named by its training stage's fingerprint; the stages after it carry their own fingerprints in their
directory names, so that changing only their settings (``head.*``, ``eval.*``) writes beside the earlier results
instead of finding them complete.
"""

from __future__ import annotations

import re

from .store import clean_path

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _name(value: str, what: str) -> str:
    """A path component (or a relative path, for nested runs) that cannot escape its parent."""
    cleaned = clean_path(value) if value else ""
    if not cleaned:
        raise ValueError(f"{what} must be a non-empty name, got {value!r}")
    return cleaned


def tokens_dir(fingerprint: str) -> str:
    return f"tokens/{_name(fingerprint, 'a tokens fingerprint')}"


def teacher_cache_dir(fingerprint: str) -> str:
    return f"teacher-cache/{_name(fingerprint, 'a teacher-cache fingerprint')}"


def lock_dir(artifact: str) -> str:
    """Where the lock guarding the build of the artifact at ``artifact`` (e.g. ``tokens/<fp>``) lives."""
    return f"locks/{_name(artifact, 'an artifact path')}"


def run_dir(run: str) -> str:
    return f"runs/{_name(run, 'a run name')}"


def checkpoints_dir(run: str) -> str:
    return f"{run_dir(run)}/checkpoints"


def checkpoint_dir(run: str, step: int) -> str:
    if int(step) < 0:
        raise ValueError(f"a checkpoint step must be >= 0, got {step}")
    return f"{checkpoints_dir(run)}/step-{int(step)}"


def checkpoint_step(name: str) -> int | None:
    """The step of a ``step-<n>`` directory name (or path), None for anything else."""
    match = _STEP_DIR.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


SHORT_FINGERPRINT = 10  # hex digits of a fingerprint in a name: 40 bits, no collision among one run's variants


def short(fingerprint: str) -> str:
    return _name(fingerprint, "a fingerprint")[:SHORT_FINGERPRINT]


def lm_head_run(run: str, fingerprint: str) -> str:
    """The LM-head stage's own run (``checkpoints_dir`` of it holds the head's checkpoints)."""
    return f"{run}/lm-head-{short(fingerprint)}"


def eval_dir(run: str, fingerprint: str) -> str:
    return f"{run_dir(run)}/eval-{short(fingerprint)}"


def student_dir(run: str, fingerprint: str) -> str:
    return f"{run_dir(run)}/student-{short(fingerprint)}"
