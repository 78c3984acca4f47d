"""Two runs building the same token shards at once (flows of different runs share ``tokens/<fp>``): the second waits
for the first and reuses its shards, and never deletes them from under it as an interrupted attempt's debris."""

import logging
import shutil
import threading

from distill import data
from distill.config import load_config
from distill.plan import make_plan, open_store, preflight
from distill.progress import Reporter
from storage import layout, shards
from storage.lease import acquire_lock

from .conftest import TINY, tiny_overrides


def tokenize_stage(tiny_teacher, root):
    cfg = load_config(TINY, tiny_overrides(tiny_teacher, root))
    return cfg, open_store(cfg), make_plan(cfg, "superposition-distill", preflight(cfg, "superposition-distill"))


def start_second_run(cfg, store, stage) -> tuple[threading.Thread, dict]:
    outcome = {}

    def run():
        try:
            outcome["manifest"] = data.run_tokenize(cfg, store, stage, Reporter())
        except BaseException as exc:  # reported by the test, not lost in the thread
            outcome["error"] = exc

    thread = threading.Thread(target=run)
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
    cfg, store, plan = tokenize_stage(tiny_teacher, tmp_path / "shared")
    path = plan["tokenize"]["path"]
    first, partial = first_run_in_progress(store, tmp_path / "shared", path)
    thread, second = start_second_run(cfg, store, plan["tokenize"])
    thread.join(1.5)
    assert thread.is_alive() and not second  # it waits...
    assert partial.read_bytes() == b"being written"  # ...and has deleted nothing of the first run's
    assert "is being written by another process; waiting up to 3600 s" in caplog.text
    # The first run finishes: the same shards, built under another root, put in place.
    other_cfg, other_store, other_plan = tokenize_stage(tiny_teacher, tmp_path / "elsewhere")
    built = data.run_tokenize(other_cfg, other_store, other_plan["tokenize"], Reporter())
    shutil.rmtree(tmp_path / "shared" / path)
    shutil.copytree(tmp_path / "elsewhere" / path, tmp_path / "shared" / path)
    stored = {p: p.stat().st_mtime_ns for p in (tmp_path / "shared" / path).rglob("*")}
    first.release()
    thread.join(60)
    assert second == {"manifest": built}  # the first run's shards, as they are...
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "shared" / path).rglob("*")} == stored  # ...not rebuilt
    assert len(shards.read_token_shards(store, f"{path}/train")["input_ids"]) == cfg.data.max_train_rows


def test_a_second_run_builds_the_shards_when_the_first_stops_unfinished(tiny_teacher, tmp_path):
    cfg, store, plan = tokenize_stage(tiny_teacher, tmp_path)
    path = plan["tokenize"]["path"]
    first, partial = first_run_in_progress(store, tmp_path, path)
    thread, second = start_second_run(cfg, store, plan["tokenize"])
    thread.join(1.5)
    assert thread.is_alive() and partial.read_bytes() == b"being written"
    first.release()  # it stopped (died, or failed) without finishing: its lock goes with it
    thread.join(60)
    assert "error" not in second, second.get("error")
    assert second["manifest"]["splits"]["train"]["rows"] == cfg.data.max_train_rows
    assert len(shards.read_token_shards(store, f"{path}/train")["input_ids"]) == cfg.data.max_train_rows
