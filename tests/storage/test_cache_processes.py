"""The teacher cache against real processes: a writer killed with SIGKILL mid-build resumes to a byte-identical
cache, and two writers started on the same cache never both write it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.cache import TeacherCacheReader

from .helpers import REPO, build_cache, describe, small_spec, tree_bytes

SPEC = small_spec(num_samples=36, chunk_size=3)  # 12 chunks


def start_workers(store, path: str, *settings: dict) -> list[subprocess.Popen]:
    """Writer processes (see cache_worker.py), one per ``settings`` (delay, lock_timeout, lease_ttl, gate), started
    together; returns once each has imported everything and said ``ready``."""
    processes = []
    for options in settings:
        options = {"delay": 0, "lock_timeout": 0, "lease_ttl": 2, "gate": None, "chunks": None, **options}
        command = [sys.executable, "-m", "tests.storage.cache_worker", describe(store), path,
                   json.dumps(SPEC.to_dict()), str(options["delay"]), str(options["lock_timeout"]),
                   str(options["lease_ttl"]), *([str(options["gate"])] if options["gate"] else [])]
        shard = {"CACHE_CHUNKS": options["chunks"]} if options["chunks"] else {}
        processes.append(subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **shard},
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for process in processes:
        assert process.stdout.readline().strip() == "ready", finish(process)
    return processes


def finish(process: subprocess.Popen, timeout: float = 120) -> str:
    """The rest of the worker's output once it exits (read from the same buffered stream as ``ready``)."""
    process.wait(timeout)
    return process.stdout.read()


def wait_for_records(store, path: str, count: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(store.list(f"{path}/_chunks")) < count:
        assert process.poll() is None, finish(process)
        assert time.monotonic() < deadline, "the worker wrote nothing in time"
        time.sleep(0.05)


def relative_tree(store, path: str) -> dict[str, bytes]:
    return {name[len(path):]: data for name, data in tree_bytes(store, path).items()}


@pytest.fixture
def reference(store) -> dict[str, bytes]:
    """The same cache built in one uninterrupted go."""
    build_cache(store, "reference", SPEC)
    return relative_tree(store, "reference")


def test_sigkill_mid_build_then_resume_is_byte_identical(store, reference):
    worker, = start_workers(store, "cache", {"delay": 0.1})
    wait_for_records(store, "cache", 3, worker)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert worker.returncode == -signal.SIGKILL
    reader = TeacherCacheReader(store, "cache")
    report = reader.verify()
    assert report.missing and not report.corrupt and not reader.complete
    # a chunk torn by the crash: its data half there, its record absent; it must count as missing and be rewritten
    torn = report.missing[-1]
    store.write_bytes(f"cache/data.zarr/hidden/layer_2/c.{torn}.0.0", b"torn write")
    if store.is_local:  # and one killed before its rename: a hidden temporary that nothing would ever read
        debris = Path(store.full_path(f"cache/data.zarr/hidden/layer_2/.c.{torn}.0.0.{'0' * 32}.tmp"))
        debris.write_bytes(b"half a chunk")

    wrote = build_cache(store, "cache", SPEC, lock_timeout=30)  # on S3 this waits out the dead writer's lease
    assert wrote == len(report.missing)
    assert relative_tree(store, "cache") == reference
    assert TeacherCacheReader(store, "cache").verify().ok
    if store.is_local:
        assert not list(Path(store.full_path("cache")).rglob("*.tmp"))  # the resuming writer removed it


def test_two_writers_never_write_the_same_cache(store, reference, tmp_path):
    gate = tmp_path / "go"
    first, = start_workers(store, "cache", {"gate": gate})
    wait_for_records(store, "cache", 1, first)  # it holds the lock and waits at the gate
    impatient, patient = start_workers(store, "cache", {"lock_timeout": 0}, {"lock_timeout": 60})
    out = finish(impatient)
    assert impatient.returncode == 3, out
    assert f"the teacher cache at {store.url('cache')} is being written by process {first.pid}" in out
    assert "wait for it to finish and rerun" in out
    assert patient.poll() is None  # still waiting for the lock
    gate.touch()
    first_out, patient_out = finish(first), finish(patient)
    assert first.returncode == 0 and first_out.strip().endswith("wrote 12"), first_out
    assert patient.returncode == 0 and patient_out.strip().endswith("wrote 0"), patient_out  # waited, found it done
    # said so first, naming the holder and, for a lease, when a crashed holder's runs out; the impatient one did not
    assert (f"waiting: the teacher cache at {store.url('cache')} is being written by process {first.pid} on "
            f"{socket.gethostname()}; waiting up to 60 s for it to finish") in patient_out and "waiting" not in out
    if store.is_local:
        assert "(if that process dies, its lock is released at once)" in patient_out
    else:
        assert re.search(r"\(its lease runs out at \d\d:\d\d:\d\d UTC, in \d+ s, unless that process renews it; a "
                         r"crashed holder's lease runs out by itself, and this run then takes over\)", patient_out)
    assert relative_tree(store, "cache") == reference


def test_shard_writers_of_disjoint_chunks_fill_one_cache_at_once_and_a_killed_one_costs_only_its_chunks(store,
                                                                                                       reference):
    """Three processes write chunks 0-3, 4-7 and 8-11 of one cache at the same time; the third is killed midway. Its
    rerun writes only what it had not recorded, the others' work and in-flight files are never touched, and a writer
    of the whole cache then finishes it: byte for byte the cache one writer builds."""
    shard = {"lock_timeout": 30}  # each takes the cache's lock for the moment it opens the group
    first, second, third = start_workers(store, "cache", {**shard, "delay": 0.05, "chunks": "0:4"},
                                         {**shard, "delay": 0.05, "chunks": "4:8"},
                                         {**shard, "delay": 0.3, "chunks": "8:12"})
    wait_for_records(store, "cache", 6, third)
    third.send_signal(signal.SIGKILL)
    third.wait()
    assert [finish(w).strip().splitlines()[-1] for w in (first, second)] == ["wrote 4", "wrote 4"]
    survived = [c for c in range(8, 12) if store.exists(f"cache/_chunks/chunk-{c:06d}.json")]
    assert len(survived) < 4 and not store.is_complete("cache")  # a shard writer never finishes the cache
    if store.is_local:  # the killed writer's half-written object of its next chunk
        debris = Path(store.full_path(f"cache/data.zarr/hidden/layer_2/.c.11.0.0.{'0' * 32}.tmp"))
        debris.write_bytes(b"half a chunk")
    rerun, = start_workers(store, "cache", {"chunks": "8:12", "lock_timeout": 30})  # S3: waits out the dead lease
    assert finish(rerun).strip().endswith(f"wrote {4 - len(survived)}")
    assert build_cache(store, "cache", SPEC) == 0 and store.is_complete("cache")  # nothing missing: it finishes
    ranges = re.compile(r"^/_ranges/")  # the shard writers' locks
    assert {k: v for k, v in relative_tree(store, "cache").items() if not ranges.match(k)} == reference
    assert TeacherCacheReader(store, "cache").verify().ok
    if store.is_local:
        assert not list(Path(store.full_path("cache")).rglob("*.tmp"))
