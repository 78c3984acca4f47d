"""Two runs building the same token shards at once (flows of different runs share ``tokens/<fp>``): the second waits
for the first and reuses its shards, and never deletes them from under it as an interrupted attempt's debris."""

import logging
import re
import shutil
import threading

from distill.plan import plan_run
from distill.stage import execute
from distill.stages import STAGES
from storage import layout, shards
from storage.lease import acquire_lock

from .conftest import TINY, tiny_overrides


def tokenize_stage(tiny_teacher, root):
    run, store = plan_run("superposition-distill", TINY, tiny_overrides(tiny_teacher, root), logging.getLogger())
    return run, store, run.stages["tokenize"].path


def tokenize(run):
    return execute(STAGES["tokenize"], run.context("tokenize"))


def start_second_run(run) -> tuple[threading.Thread, dict]:
    outcome = {}

    def work():
        try:
            outcome["manifest"] = tokenize(run)
        except BaseException as exc:  # reported by the test, not lost in the thread
            outcome["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    return thread, outcome


def first_run_in_progress(store, root, path):
    """The first run holds the lock and has written part of a shard."""
    lock = acquire_lock(store, layout.lock_dir(path), "the first run's token shards", timeout=5)
    partial = root / path / "train" / shards.shard_name(0)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"being written")
    return lock, partial


def test_a_second_run_waits_for_the_first_and_reuses_its_shards(tiny_teacher, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run, store, path = tokenize_stage(tiny_teacher, tmp_path / "shared")
    first, partial = first_run_in_progress(store, tmp_path / "shared", path)
    thread, second = start_second_run(run)
    thread.join(1.5)
    assert thread.is_alive() and not second  # it waits...
    assert partial.read_bytes() == b"being written"  # ...and has deleted nothing of the first run's
    assert re.search(r"the tokenize stage at .* is being written by process \d+ on \S+; waiting up to 86400 s for it "
                     r"to finish", caplog.text), caplog.text
    # The first run finishes: the same shards, built under another root, put in place.
    other, _, _ = tokenize_stage(tiny_teacher, tmp_path / "elsewhere")
    built = tokenize(other)
    shutil.rmtree(tmp_path / "shared" / path)
    shutil.copytree(tmp_path / "elsewhere" / path, tmp_path / "shared" / path)
    stored = {p: p.stat().st_mtime_ns for p in (tmp_path / "shared" / path).rglob("*")}
    first.release()
    thread.join(60)
    assert second == {"manifest": built}  # the first run's shards, as they are...
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "shared" / path).rglob("*")} == stored  # ...not rebuilt
    assert len(shards.read_token_shards(store, f"{path}/train")["input_ids"]) == run.config.data.max_train_rows


def test_a_second_run_builds_the_shards_when_the_first_stops_unfinished(tiny_teacher, tmp_path):
    run, store, path = tokenize_stage(tiny_teacher, tmp_path)
    first, partial = first_run_in_progress(store, tmp_path, path)
    thread, second = start_second_run(run)
    thread.join(1.5)
    assert thread.is_alive() and partial.read_bytes() == b"being written"
    first.release()  # it stopped (died, or failed) without finishing: its lock goes with it
    thread.join(60)
    assert "error" not in second, second.get("error")
    assert second["manifest"].splits["train"].rows == run.config.data.max_train_rows
    assert len(shards.read_token_shards(store, f"{path}/train")["input_ids"]) == run.config.data.max_train_rows
