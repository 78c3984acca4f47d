"""What a stage is, and ``execute``: the one place that decides whether a stage is done, holds its lock, clears
what a killed attempt left, and marks it complete.

A ``Stage`` has one ``name``: its key in the plan, its Prefect task, its module (``distill/stages/<name>.py``) and
its artifact directory. Its fingerprint hashes its ``version``, the settings its output depends on and its upstream
stage's fingerprint, so a change anywhere upstream, or in what the stage writes (a new ``version``), gives it a new
directory: old artifacts are never read as new ones, they are rebuilt once. Its ``run`` does only the work, from
typed upstream manifests to a typed manifest; ``execute`` does the rest.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from storage import ArtifactStore, IntegrityError, fingerprint, layout
from storage.lease import holding_lock

from .config import PipelineConfig
from .device import resolve_device
from .progress import Reporter
from .teacher import Teacher, TeacherFacts

LOCK_TIMEOUT_S = 24 * 3600.0  # how long a second run of the same stage waits for the first (a training takes hours)


class Manifest(BaseModel):
    """What a finished stage hands downstream: small, JSON, typed; stored as its completion marker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str
    fingerprint: str
    path: str
    files: dict[str, str] = {}  # SHA-256 of each file the stage wrote, by its path under ``path`` (execute records it)

    def parts(self) -> list[str]:
        """Sub-artifacts with completion markers of their own (a teacher cache's splits): the stage is finished only
        while every one of them is."""
        return []


class Split(BaseModel):
    """One split (train or eval) of a stage's output: where it is and how many rows it holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    rows: int
    chunks: int | None = None  # the teacher cache's


class Shard(BaseModel):
    """A part of a stage's work that a worker of its own can do beside the others (a range of a split's chunks)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.start}-{self.stop - 1}"


@dataclass
class Context:
    """What a stage's ``run`` works with: the resolved configuration, the store, the teacher, where its progress
    goes, its own directory and fingerprint (from the plan), and while ``execute`` runs it, its lock."""

    config: PipelineConfig
    store: ArtifactStore
    teacher: Teacher
    reporter: Reporter = field(default_factory=Reporter)
    path: str = ""
    fingerprint: str = ""
    fingerprints: dict[str, str] = field(default_factory=dict)  # every stage of the run's, for its report
    lock: Any = None  # ``ensure_held()`` before recording progress: on an object store the lease can be lost

    @cached_property
    def device(self) -> torch.device:
        return resolve_device(self.config.teacher.device)

    def ensure_held(self) -> None:
        if self.lock is not None:
            self.lock.ensure_held()

    def manifest(self, cls: type[Manifest], stage: str, **fields) -> Manifest:
        return cls(stage=stage, fingerprint=self.fingerprint, path=self.path, **fields)


@dataclass
class Preflight:
    """What a stage's ``check`` may look at before any work: the configuration and the teacher's config and
    tokenizer (no weights)."""

    config: PipelineConfig
    teacher: Teacher
    facts: TeacherFacts
    flow: str


class Stage:
    """One stage of the pipeline; subclasses set ``name``, ``version`` and ``Manifest`` and implement ``settings``
    and ``run``."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    Manifest: ClassVar[type[Manifest]]
    shared: ClassVar[bool] = False  # one directory per fingerprint for every run (tokenize, teacher_cache)
    checksummed: ClassVar[bool] = True  # execute records its files' checksums (the teacher cache keeps its own)

    def check(self, pre: Preflight) -> None:
        """Raise ``ConfigError`` naming the field if this stage could not run with ``pre.config``."""

    def settings(self, cfg: PipelineConfig, teacher: TeacherFacts) -> dict:
        """What the stage's output depends on besides its upstream stage's output."""
        raise NotImplementedError

    def fingerprint(self, cfg: PipelineConfig, teacher: TeacherFacts, upstream: str | None) -> str:
        return fingerprint({"stage": self.name, "version": self.version, **self.settings(cfg, teacher)}, upstream)

    def run(self, ctx: Context, **inputs: Manifest) -> Manifest:
        raise NotImplementedError

    def shards(self, ctx: Context, workers: int, **inputs: Manifest) -> list[Shard] | None:
        """The stage's work split for ``workers`` workers, for stages that can run on several at once (then
        ``run_shard`` does one shard, and ``run`` afterwards only what the shards left); None for the others."""
        return None

    def run_shard(self, ctx: Context, shard: Shard, **inputs: Manifest) -> int:
        raise NotImplementedError

    def resumes(self, cfg: PipelineConfig, store: ArtifactStore, path: str) -> str | None:
        """What an unfinished run of this stage left to resume from (``python -m flows plan``), if anything."""
        return None

    def verify(self, ctx: Context, manifest: Manifest, repair: bool) -> list[str]:
        """Check a finished stage's files against the checksums ``execute`` recorded; the problems found. With
        ``repair`` and problems, withdraw its completion so that the next run redoes it."""
        problems = []
        for name, expected in manifest.files.items():
            try:
                actual = ctx.store.sha256(f"{manifest.path}/{name}")
            except FileNotFoundError:
                problems.append(f"{name} is missing")
                continue
            if actual != expected:
                problems.append(f"{name} does not match the checksum recorded when it was written")
        if problems and repair:
            ctx.store.unmark_complete(manifest.path)
        return problems


def finished(stage: Stage, store: ArtifactStore, path: str) -> Manifest | None:
    """The manifest of the stage at ``path`` if it is finished (its marker and that of every part), else None."""
    if not store.is_complete(path):
        return None
    manifest = stage.Manifest.model_validate(store.read_manifest(path))
    return manifest if all(store.is_complete(part) for part in manifest.parts()) else None


def execute(stage: Stage, ctx: Context, **inputs: Manifest) -> Manifest:
    """The stage's manifest: the stored one when it is finished, else ``stage.run``'s, under the stage's lock.

    A second run of the same stage (a manual one beside the nightly deployment's) waits for the first and then
    finds it finished, or resumes what the first left if it died. Before running, a killed attempt's hidden
    temporary files are cleared (the exported directory is uploaded to the Hub as it is), which only the lock's
    holder may do: another run may be writing its own at that moment. The completion marker is written last, with
    the checksums of every file the stage wrote, and only while the lock is still held."""
    store, path = ctx.store, ctx.path
    if (done := finished(stage, store, path)) is not None:
        return done
    what = f"the {stage.name} stage at {store.url(path)}"
    with holding_lock(store, layout.lock_dir(path), what, LOCK_TIMEOUT_S, on_wait=ctx.reporter.log) as lock:
        if (done := finished(stage, store, path)) is not None:  # finished by the run this one waited for
            return done
        store.unmark_complete(path)  # a part reopened by a repair: the stage redoes what is missing
        store.remove_temporaries(path)
        ctx.lock = lock
        recording = store.recording(path, skip=("checkpoints",)) if stage.checksummed else nullcontext({})
        with recording as checksums:
            manifest = stage.run(ctx, **inputs)
        lock.ensure_held()
        manifest = manifest.model_copy(update={"files": dict(sorted(checksums.items()))})
        store.mark_complete(path, manifest.model_dump(mode="json"))
    return manifest


def verify_stage(stage: Stage, ctx: Context, repair: bool = False) -> tuple[str, list[str]]:
    """``(state, problems)`` of the stage at ``ctx.path``: ``"not finished"``, or its files checked (and with
    ``repair``, what is damaged reopened for the next run)."""
    if not ctx.store.is_complete(ctx.path):
        return "not finished", []
    manifest = stage.Manifest.model_validate(ctx.store.read_manifest(ctx.path))
    try:
        problems = stage.verify(ctx, manifest, repair)
    except IntegrityError as exc:
        problems = [str(exc)]
    return ("damaged" if problems else "intact"), problems
