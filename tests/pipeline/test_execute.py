"""``execute``, the one place that decides whether a stage is done: a second run of a stage waits for the first and
reuses its work; a killed attempt's debris never becomes part of a finished stage; the files a stage wrote are
checksummed, so that damage is found and reopened for the next run."""

import logging
import threading

import pytest

from distill.config import load_config
from distill.plan import plan_run
from distill.progress import Reporter
from distill.stage import Context, Manifest, Stage, execute, finished, verify_stage
from distill.stages import STAGES
from distill.teacher import Teacher
from storage import ArtifactStore

from .conftest import TINY, tiny_overrides


class Written(Manifest):
    note: str


class WritesTwoFiles(Stage):
    """A stage that writes a file, a checkpoint and a second file, and counts its runs."""

    name = "writes"
    Manifest = Written

    def __init__(self, started: threading.Event | None = None, release: threading.Event | None = None):
        self.runs, self.started, self.release = 0, started, release

    def settings(self, cfg, teacher) -> dict:
        return {}

    def run(self, ctx: Context) -> Written:
        self.runs += 1
        if self.started is not None:
            self.started.set()
            self.release.wait(10)
        ctx.store.write_bytes(f"{ctx.path}/a.txt", b"a")
        ctx.store.write_bytes(f"{ctx.path}/checkpoints/step-1/state.bin", b"kept apart")
        ctx.store.write_json(f"{ctx.path}/b/c.json", {"c": 1})
        return ctx.manifest(Written, self.name, note="done")


def context(store: ArtifactStore, path: str = "runs/r/writes-0123456789", reporter=None) -> Context:
    cfg = load_config("quickstart")
    return Context(config=cfg, store=store, teacher=Teacher(cfg.teacher), path=path, fingerprint="0123456789abcdef",
                   **({"reporter": reporter} if reporter else {}))


def test_a_finished_stage_is_returned_as_stored_and_its_files_checksummed(tmp_path):
    store, stage = ArtifactStore(str(tmp_path)), WritesTwoFiles()
    manifest = execute(stage, context(store))
    assert stage.runs == 1 and sorted(manifest.files) == ["a.txt", "b/c.json"]  # checkpoints are not its output
    assert execute(stage, context(store)) == manifest and stage.runs == 1
    assert verify_stage(stage, context(store)) == ("intact", [])
    (tmp_path / manifest.path / "a.txt").write_bytes(b"b")
    (tmp_path / manifest.path / "b" / "c.json").unlink()
    state, problems = verify_stage(stage, context(store))
    assert state == "damaged" and problems == ["a.txt does not match the checksum recorded when it was written",
                                               "b/c.json is missing"]
    assert finished(stage, store, manifest.path) is not None  # found, not changed...
    verify_stage(stage, context(store), repair=True)
    assert finished(stage, store, manifest.path) is None  # ...until repaired: the next run redoes the stage
    assert execute(stage, context(store)).files == manifest.files and stage.runs == 2
    assert verify_stage(stage, context(store)) == ("intact", [])


def test_a_killed_attempts_hidden_temporaries_are_not_part_of_the_finished_stage(tmp_path):
    """A write killed before its rename leaves a hidden temporary file; the stage's next attempt clears them before
    it runs (the exported directory is uploaded to the Hub as it is)."""
    store, stage = ArtifactStore(str(tmp_path)), WritesTwoFiles()
    path = tmp_path / "runs/r/writes-0123456789"
    (path / "b").mkdir(parents=True)
    (path / "b" / ".c.json.0123abcd.tmp").write_bytes(b"half a file")
    execute(stage, context(store))
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == [
        "_COMPLETE.json", "a.txt", "b/c.json", "checkpoints/step-1/state.bin"]


class Log(Reporter):
    def __init__(self):
        super().__init__()
        self.messages = []

    def log(self, message, level=logging.INFO):
        self.messages.append(message)


def test_a_second_run_of_a_stage_waits_for_the_first_and_reuses_its_work(tmp_path):
    store = ArtifactStore(str(tmp_path))
    started, release = threading.Event(), threading.Event()
    stage, results, log = WritesTwoFiles(started, release), {}, Log()
    first = threading.Thread(target=lambda: results.update(first=execute(stage, context(store))))
    first.start()
    assert started.wait(10)  # the first run is inside the stage, holding its lock
    second = threading.Thread(target=lambda: results.update(second=execute(stage, context(store, reporter=log))))
    second.start()
    second.join(1.0)
    assert second.is_alive() and stage.runs == 1  # waiting, not running beside the first
    assert any("the writes stage at" in m and "is being written by process" in m for m in log.messages)
    release.set()
    first.join(10), second.join(10)
    assert stage.runs == 1 and results["second"] == results["first"]


@pytest.mark.usefixtures("tiny_teacher")
def test_two_runs_evaluating_the_same_student_evaluate_it_once(tiny_teacher, tmp_path, monkeypatch):
    run, _ = plan_run("self-distill", TINY, tiny_overrides(tiny_teacher, tmp_path), logging.getLogger())
    tokens = execute(STAGES["tokenize"], run.context("tokenize"))
    student = execute(STAGES["self_distill"], run.context("self_distill"), tokens=tokens)
    evaluate, runs, inside, release = STAGES["evaluate"], [], threading.Event(), threading.Event()
    real_run = type(evaluate).run

    def slow_run(self, ctx, **inputs):
        runs.append(ctx.path)
        inside.set()
        release.wait(30)
        return real_run(self, ctx, **inputs)

    monkeypatch.setattr(type(evaluate), "run", slow_run)
    results, logs = {}, Log()

    def evaluate_in(name, reporter=None):
        ctx = run.context("evaluate", reporter)
        results[name] = execute(evaluate, ctx, student=student, tokens=tokens)

    first = threading.Thread(target=evaluate_in, args=("first",))
    first.start()
    assert inside.wait(30)
    second = threading.Thread(target=evaluate_in, args=("second", logs))
    second.start()
    second.join(1.0)
    assert second.is_alive() and len(runs) == 1
    release.set()
    first.join(60), second.join(60)
    assert len(runs) == 1 and results["second"] == results["first"]
    assert any("the evaluate stage at" in m for m in logs.messages)
