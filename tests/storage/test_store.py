"""ArtifactStore on a local directory and on S3 (moto over HTTP): files, markers, listing, deletion, directory
upload, and the fail-fast errors for bad roots."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from storage import ArtifactStore, IncompleteArtifactError, StoreError

from .conftest import CREDENTIALS, free_port, make_bucket
from .helpers import can_mount, run_on_tmpfs


def test_bytes_and_json_round_trip(store):
    store.write_bytes("a/b/data.bin", b"\x00\x01payload")
    store.write_json("a/meta.json", {"x": [1, 2.5, None], "y": "z"})
    assert store.read_bytes("a/b/data.bin") == b"\x00\x01payload"
    assert store.read_json("a/meta.json") == {"x": [1, 2.5, None], "y": "z"}
    assert store.exists("a/b/data.bin") and store.exists("a") and not store.exists("nope")
    assert store.list("a") == ["a/b", "a/meta.json"]
    assert store.find("a") == ["a/b/data.bin", "a/meta.json"]  # no temporary files left behind
    assert store.url("a", "meta.json") == f"{store.root}/a/meta.json"
    store.write_bytes("a/b/data.bin", b"replaced")
    assert store.read_bytes("a/b/data.bin") == b"replaced"
    with pytest.raises(FileNotFoundError, match="nope"):
        store.read_bytes("nope/x")


def test_completion_marker_and_deletion(store):
    store.write_bytes("stage/part-0", b"0")
    assert not store.is_complete("stage")
    with pytest.raises(IncompleteArtifactError, match=f"{store.root}/stage is not complete"):
        store.read_manifest("stage")
    store.mark_complete("stage", {"rows": 3})
    assert store.is_complete("stage") and store.read_manifest("stage") == {"rows": 3}
    store.delete("stage")
    assert not store.exists("stage") and not store.is_complete("stage")
    store.delete("stage")  # deleting what is gone is fine
    with pytest.raises(ValueError, match="whole storage root"):
        store.delete("")


def test_the_checksums_of_what_a_stage_writes_are_recorded_as_written_and_match_a_read_back(store, tmp_path):
    """``recording`` hashes the bytes as they are written (nothing read back); ``sha256`` streams a stored file."""
    (tmp_path / "big.bin").write_bytes(os.urandom(3 << 20))
    with store.recording("stage/a", skip=("checkpoints",)) as ledger:
        store.write_bytes("stage/a/x.bin", b"x")
        store.write_many({"stage/a/sub/y.json": b"{}", "stage/b/z.bin": b"elsewhere"})
        store.put_file(tmp_path / "big.bin", "stage/a/big.bin")
        store.write_bytes("stage/a/checkpoints/step-1/t.bin", b"kept apart")
        store.mark_complete("stage/a/sub", {"rows": 1})  # markers are not the stage's output
    store.write_bytes("stage/a/late.bin", b"after")
    assert sorted(ledger) == ["big.bin", "sub/y.json", "x.bin"]
    assert all(store.sha256(f"stage/a/{name}") == sha for name, sha in ledger.items())
    with pytest.raises(FileNotFoundError):
        store.sha256("stage/a/missing.bin")


def test_upload_and_download_directory(store, tmp_path):
    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "sub" / "weights.bin").write_bytes(os.urandom(70_000))
    assert store.upload_dir(source, "runs/r/student") == ["config.json", "sub/weights.bin"]
    store.mark_complete("runs/r/student", {"files": 2})
    target = tmp_path / "copy"
    store.download_dir("runs/r/student", target)
    assert (target / "sub" / "weights.bin").read_bytes() == (source / "sub" / "weights.bin").read_bytes()
    assert json.loads((target / "_COMPLETE.json").read_text()) == {"files": 2}


def test_a_file_written_into_new_directories_is_durable_with_them(local_store, fsyncs):
    local_store.write_bytes("old/file", b"0")
    root = Path(local_store.full_path("old")).parent.resolve()
    synced = fsyncs()
    local_store.write_bytes("old/new/deeper/file.bin", b"data")
    # each new directory's entry in its parent, then the file, then the directory it was renamed in
    assert [Path(p) for p in synced[:2]] == [root / "old", root / "old/new"]
    assert ".file.bin." in synced[2] and Path(synced[3]) == root / "old/new/deeper" and len(synced) == 4
    assert (root / "old/new/deeper/file.bin").read_bytes() == b"data"
    synced.clear()
    local_store.write_bytes("old/new/deeper/second.bin", b"more")  # no new directory: no parent to persist
    assert ".second.bin." in synced[0] and [Path(p) for p in synced[1:]] == [root / "old/new/deeper"]


def test_a_forked_child_writes_several_files_with_threads_of_its_own(tmp_path):
    """write_many's shared thread pool is the parent's: a forked child must not queue work on threads it lacks."""
    store = ArtifactStore(str(tmp_path))
    store.write_many({"a": b"1", "b": b"2"})  # the parent's pool now exists
    pid = os.fork()
    if pid == 0:  # the child: exit 0 once both files are written (a hang is killed by the parent's timeout)
        store.write_many({"c": b"3", "d": b"4"})
        os._exit(0)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0, "the forked child's write_many hung"
    assert store.read_bytes("c") == b"3" and store.read_bytes("d") == b"4"


def test_paths_cannot_escape_the_root(local_store):
    for bad in ("../x", "a/../../x", "/etc/passwd"):
        with pytest.raises(ValueError, match="relative"):
            local_store.write_bytes(bad, b"")


def test_file_url_and_relative_paths_mean_the_same_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ArtifactStore(f"file://{tmp_path}/root").write_bytes("x", b"1")
    assert ArtifactStore("root").read_bytes("x") == b"1"


def test_s3_settings_from_the_standard_environment(s3_options, monkeypatch):
    bucket = make_bucket(s3_options)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_options["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["secret"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", CREDENTIALS["region"])
    store = ArtifactStore(f"s3://{bucket}/prefix")
    store.write_json("k.json", [1])
    assert store.read_json("k.json") == [1]


# ---- bad roots -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("root", ["ftp://host/dir", "gs://bucket/x", "hdfs:///data"])
def test_unknown_scheme(root):
    with pytest.raises(StoreError, match=r"unsupported storage root .*s3://bucket/prefix"):
        ArtifactStore(root)


def test_s3_root_without_bucket():
    with pytest.raises(StoreError, match="names no bucket"):
        ArtifactStore("s3://")


def test_storage_options_that_would_be_ignored_or_fail_deep_in_aiobotocore_are_named(tmp_path):
    with pytest.raises(StoreError, match=r"unknown option 'endpoint' \(did you mean 'endpoint_url'\?\)"):
        ArtifactStore("s3://bucket/x", storage_options={"endpoint": "http://127.0.0.1:9"}, check=False)
    ArtifactStore("s3://bucket/x", storage_options={"profile": "ci", "aws_access_key_id": "k"}, check=False)
    with pytest.raises(StoreError, match=r"storage options \['endpoint_url'\] were given for the local root"):
        ArtifactStore(str(tmp_path), storage_options={"endpoint_url": "http://127.0.0.1:9"})


def test_unreachable_endpoint_fails_fast():
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(StoreError, match=f"cannot reach the S3 endpoint {endpoint} for s3://bucket/x.*endpoint_url"):
        ArtifactStore("s3://bucket/x", storage_options={"endpoint_url": endpoint, **CREDENTIALS})
    assert time.monotonic() - started < 15


def test_missing_bucket(s3_options):
    with pytest.raises(StoreError, match=r"bucket 'no-such-bucket' does not exist .*aws s3 mb s3://no-such-bucket"):
        ArtifactStore("s3://no-such-bucket/prefix", storage_options=s3_options)


def test_missing_credentials(s3_options, monkeypatch, tmp_path):
    bucket = make_bucket(s3_options)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreError, match=f"no AWS credentials for s3://{bucket}/p: set AWS_ACCESS_KEY_ID"):
        ArtifactStore(f"s3://{bucket}/p", storage_options={"endpoint_url": s3_options["endpoint_url"]})


def test_root_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="is not a directory"):
        ArtifactStore(str(tmp_path / "file"))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_root_that_cannot_be_created(tmp_path):
    with pytest.raises(StoreError, match="cannot use /proc/no-such-root/x as the storage root: No such file or "
                                         "directory; choose a directory that can be created and written to"):
        ArtifactStore("/proc/no-such-root/x")


# ---- read-only and full filesystems: real tmpfs mounts in a private mount namespace ------------------------------

READ_ONLY = """
import json
from storage import ArtifactStore, StoreError
out = {}
for root in (MOUNT, MOUNT + "/new-dir"):
    try:
        ArtifactStore(root)
        out[root] = "accepted"
    except StoreError as exc:
        out[root] = str(exc)
ArtifactStore(MOUNT, read_only=True)  # reading a read-only root is fine
print(json.dumps(out))
"""


def test_read_only_root(tmp_path):
    mount = tmp_path / "ro"
    if can_mount():  # a read-only file system
        out = run_on_tmpfs("ro,size=1m", mount, f"MOUNT = {str(mount)!r}\n" + READ_ONLY)
    elif os.geteuid() != 0:  # no namespaces, but permissions bind a normal user
        mount.mkdir(mode=0o555)
        out = {}
        for root in (str(mount), f"{mount}/new-dir"):
            with pytest.raises(StoreError) as error:
                ArtifactStore(root)
            out[root] = str(error.value)
    else:
        pytest.skip("root without user namespaces: no way to make a directory read-only here")
    for root, message in out.items():
        assert "read-only or not permitted" in message and root in message and "writable storage root" in message


FULL_DISK = """
import json, os, numpy as np
from storage import ArtifactStore, StoreError
from storage.cache import TeacherCacheWriter, CacheWriteError
from tests.storage.helpers import small_spec, chunk_arrays
store = ArtifactStore(MOUNT + "/artifacts")
store.write_json("done/data.json", {"ok": True})
store.mark_complete("done", {"files": 1})
out = {}
try:
    store.write_bytes("big/data.bin", os.urandom(3 << 20))
    out["big"] = "written"
except StoreError as exc:
    out["big"] = str(exc)
out["big_exists"] = store.exists("big/data.bin")
out["leftovers"] = [n for n in os.listdir(MOUNT + "/artifacts/big")] if os.path.isdir(MOUNT + "/artifacts/big") else []
out["done"] = [store.is_complete("done"), store.read_json("done/data.json")]
store.delete("big")

# the teacher cache: chunks that do not fit fail in the writer thread and stay missing
spec = small_spec(hidden_size=20_000, dtype="float32", codec="none", num_samples=6, chunk_size=2, topk=0)
writer = TeacherCacheWriter(store, "cache", spec)
try:
    with writer:
        for chunk in writer.missing_chunks():
            writer.write_chunk(chunk, chunk_arrays(spec, chunk))
    out["cache"] = "written"
except CacheWriteError as exc:
    out["cache"] = str(exc)
reopened = TeacherCacheWriter(store, "cache", spec)
out["missing"] = reopened.missing_chunks()
reopened.close()
out["cache_complete"] = store.is_complete("cache")
print(json.dumps(out))
"""


def test_full_disk_leaves_nothing_that_looks_complete(tmp_path):
    mount = tmp_path / "full"
    out = run_on_tmpfs("size=2m", mount, f"MOUNT = {str(mount)!r}\n" + FULL_DISK)
    assert out["big"].startswith(f"disk full: cannot write {mount}/artifacts/big/data.bin") and "free space" in out["big"]
    assert out["big_exists"] is False and out["leftovers"] == []  # no half-written file, no temporary
    assert out["done"] == [True, {"ok": True}]  # what was complete is untouched
    assert "disk full" in out["cache"] and "stay missing" in out["cache"]
    assert out["missing"] and out["cache_complete"] is False  # 3 chunks of 2 x 6 x 20000 x 4 B = 1.9 MB: no room
