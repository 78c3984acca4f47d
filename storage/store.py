"""``ArtifactStore``: every artifact of the pipeline, on a local disk or in an S3 bucket, through one fsspec URL.

Paths given to the methods are relative to the root (``tokens/<fp>/train/shard-00000.parquet``), always with ``/``.

Atomicity
    A file is never visible half-written. Locally it is written to a hidden temporary name in the same directory,
    fsync'ed, then renamed over the target (``os.replace`` is atomic on POSIX), and the directory (and any directory
    the write created, in its parent) fsync'ed. On S3 a PUT is atomic by itself.
    An artifact made of several files is finished by ``mark_complete``, which writes ``_COMPLETE.json`` (the
    artifact's manifest) last; readers trust only artifacts that have it, and ``delete`` removes it first. So a crash
    or a full disk at any point leaves at worst an unfinished artifact that a rerun rebuilds, never one that looks
    complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import fsspec

from .errors import IncompleteArtifactError, StoreError

MARKER = "_COMPLETE.json"
SCHEMES = ("file", "s3")
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def split_scheme(url: str) -> tuple[str, str]:
    """``("s3", "bucket/prefix")`` for ``s3://bucket/prefix``; plain paths are ``("file", path)``."""
    scheme, sep, rest = url.partition("://")
    return (scheme.lower(), rest) if sep else ("file", url)


def clean_path(path: str) -> str:
    """A relative store path without empty or ``.`` parts; ``..`` and absolute paths are refused."""
    parts = [p for p in str(path).replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts or str(path).startswith("/"):
        raise ValueError(f"store paths are relative to the root and may not contain '..': {path!r}")
    return "/".join(parts)


class ArtifactStore:
    """Artifacts under ``root``: a local path, ``file:///abs/path`` or ``s3://bucket/prefix``.

    S3 settings (``endpoint_url``, ``region``, ``key``, ``secret``, any s3fs option) come from
    ``storage_options`` or the standard AWS environment variables, so moto, MinIO and AWS all work.
    Unless ``check=False`` the constructor verifies at once that the root is usable (see ``check``).
    """

    def __init__(self, root: str, storage_options: dict | None = None, *, read_only: bool = False,
                 check: bool = True):
        scheme, rest = split_scheme(str(root))
        if scheme not in SCHEMES:
            raise StoreError(f"unsupported storage root {root!r}: the scheme {scheme!r} is not one of "
                             f"{', '.join(SCHEMES)}; use a local path, file:///absolute/path or s3://bucket/prefix")
        self.read_only = read_only
        self.is_local = scheme == "file"
        if self.is_local:
            if storage_options:
                raise StoreError(f"storage options {sorted(storage_options)} were given for the local root "
                                 f"{root!r}, which takes none (they are for an s3:// root); remove them or use an "
                                 "s3:// root")
            self.base = os.path.abspath(os.path.expanduser(rest))
            self.root = self.base
            self.storage_options: dict[str, Any] = {}
            self.fs = fsspec.filesystem("file")
        else:
            self.bucket, _, prefix = rest.partition("/")
            if not self.bucket:
                raise StoreError(f"storage root {root!r} names no bucket; use s3://bucket/prefix")
            self.prefix = prefix.strip("/")
            self.base = f"{self.bucket}/{self.prefix}".rstrip("/")
            self.root = f"s3://{self.base}"
            from .s3 import open_s3, s3_options  # s3fs costs 0.3 s to import: only for S3 roots

            self.storage_options = s3_options(storage_options)
            self.fs = open_s3(self.storage_options)
        self._ledgers: list[tuple[str, tuple[str, ...], dict[str, str]]] = []
        if check:
            self.check()

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    # ---- paths ---------------------------------------------------------------------------------------------

    def full_path(self, path: str = "") -> str:
        """The filesystem path fsspec uses (``/abs/dir/x`` locally, ``bucket/prefix/x`` on S3)."""
        rel = clean_path(path)
        return f"{self.base}/{rel}" if rel else self.base

    def url(self, *parts: str) -> str:
        """Where ``parts`` live, for people and for other tools: an absolute local path or an ``s3://`` URL."""
        full = self.full_path("/".join(parts))
        return full if self.is_local else f"s3://{full}"

    def local_path(self, path: str = "") -> Path:
        if not self.is_local:
            raise StoreError(f"{self.url(path)} is not on a local disk")
        return Path(self.full_path(path))

    def _relative(self, full: str) -> str:
        return full[len(self.base):].lstrip("/")

    # ---- checks and errors ---------------------------------------------------------------------------------

    def check(self) -> None:
        """Fail fast, before any work, with a message naming the URL and the fix: unreachable endpoint, missing
        credentials, missing bucket, a root that is not a directory, or (unless read-only) a root we cannot
        write to."""
        if not self.is_local:
            from .s3 import check_s3

            check_s3(self.root, self.bucket, self.prefix, self.storage_options, writable=not self.read_only)
            return
        if os.path.exists(self.base) and not os.path.isdir(self.base):
            raise StoreError(f"storage root {self.base} exists but is not a directory; choose a directory")
        if self.read_only:
            if not os.path.isdir(self.base):
                raise StoreError(f"storage root {self.base} does not exist; check the path")
            return
        try:
            with self.guard("create the storage root", ""):
                os.makedirs(self.base, exist_ok=True)
            with self.guard("write to the storage root", ""):
                probe = os.path.join(self.base, f".write-probe-{uuid.uuid4().hex}")
                with open(probe, "wb") as f:
                    f.write(b"probe")
                    os.fsync(f.fileno())
                os.unlink(probe)
        except OSError as exc:  # what guard leaves as it is: e.g. a parent that cannot hold directories (/proc)
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            raise StoreError(f"cannot use {self.base} as the storage root: {cause.strerror or cause}; choose a "
                             "directory that can be created and written to") from exc

    @contextmanager
    def guard(self, action: str, path: str) -> Iterator[None]:
        """Turn low-level I/O errors into ``StoreError``s that say where and what to do."""
        try:
            yield
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"cannot {action} {self.url(path)}: it does not exist") from exc
        except OSError as exc:
            if isinstance(exc, StoreError):
                raise
            if exc.errno in _FULL_DISK:
                raise StoreError(f"disk full: cannot {action} {self.url(path)} ({exc.strerror}); free space or move "
                                 "the storage root, then rerun: unfinished artifacts are never marked complete") from exc
            if exc.errno in _NOT_WRITABLE or isinstance(exc, PermissionError):
                raise StoreError(f"cannot {action} {self.url(path)}: {exc.strerror or exc} (read-only or not "
                                 "permitted); choose a writable storage root or fix its permissions") from exc
            raise

    # ---- files ---------------------------------------------------------------------------------------------

    def exists(self, path: str) -> bool:
        return self.fs.exists(self.full_path(path))

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write the whole file atomically (see the module docstring)."""
        self.write_many({path: data})

    def write_many(self, files: dict[str, bytes], *, concurrent: bool = True) -> None:
        """Write several whole files, each atomically and durably (see the module docstring), concurrently: on S3
        the PUTs, locally each file's write, fsyncs and rename in a thread of its own (``concurrent=False``: one
        after another, for comparison). Which of them exist after a failure is undefined: record completion
        separately, after this returns.

        Locally, a file's durable write is two fsyncs (its data, then its directory after the rename) that mostly
        wait on the disk, with the GIL released; one after another a chunk of the teacher cache spent most of its
        writer's time in them (docs/RESULTS.md, "Teacher cache"). Concurrent fsyncs share the file system's journal
        commits. Each file still reaches the disk before its rename and its rename before this returns, so the
        guarantees are the sequential ones."""
        for path, data in files.items():
            self._record(path, lambda data=data: hashlib.sha256(data).hexdigest())
        if self.is_local:
            def write(item: tuple[str, bytes]) -> None:
                path, data = item
                with self.guard("write", path):
                    self._write_local(self.full_path(path), lambda f: f.write(data))

            if concurrent and len(files) > 1:
                for _ in _sync_pool().map(write, files.items()):  # waits for every file; raises the first error
                    pass
            else:
                for item in files.items():
                    write(item)
        elif files:
            first = next(iter(files))
            with self.guard("write", first if len(files) == 1 else f"{first} (and {len(files) - 1} more files)"):
                self.fs.pipe({self.full_path(p): bytes(d) for p, d in files.items()})

    def read_bytes(self, path: str) -> bytes:
        with self.guard("read", path):
            return self.fs.cat_file(self.full_path(path))

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path))

    def sha256(self, path: str, block: int = 8 << 20) -> str:
        """SHA-256 of a stored file, streamed (a model's weights need not fit in memory)."""
        digest = hashlib.sha256()
        with self.guard("read", path), self.fs.open(self.full_path(path), "rb") as f:
            while chunk := f.read(block):
                digest.update(chunk)
        return digest.hexdigest()

    def read_many(self, paths: list[str]) -> dict[str, bytes | None]:
        """Several whole files at once (concurrent requests on S3), by path; ``None`` for each that does not
        exist."""
        if not paths:
            return {}
        with self.guard("read", paths[0]):  # cat_ranges, unlike cat, takes no path for a glob pattern
            data = self.fs.cat_ranges([self.full_path(p) for p in paths], None, None, on_error="return")
        found: dict[str, bytes | None] = {}
        for path, value in zip(paths, data):
            if isinstance(value, BaseException) and not isinstance(value, FileNotFoundError):
                with self.guard("read", path):
                    raise value
            found[path] = None if isinstance(value, FileNotFoundError) else value
        return found

    def read_json_many(self, paths: list[str]) -> list:
        """Several small JSON files at once (concurrent requests on S3), in the order given."""
        data = self.read_many(paths)
        for path in paths:
            if data[path] is None:
                raise FileNotFoundError(f"cannot read {self.url(path)}: it does not exist")
        return [json.loads(data[p]) for p in paths]

    def put_file(self, local_file: str | os.PathLike, path: str) -> None:
        """Copy a local file in, atomically, streaming it (model weights need not fit in memory)."""
        self._record(path, lambda: _file_sha256(local_file))
        full = self.full_path(path)
        with self.guard("write", path):
            if self.is_local:
                with open(local_file, "rb") as src:
                    self._write_local(full, lambda f: _copy_stream(src, f))
            else:
                self.fs.put_file(os.fspath(local_file), full)

    def get_file(self, path: str, local_file: str | os.PathLike) -> None:
        with self.guard("read", path):
            self.fs.get_file(self.full_path(path), os.fspath(local_file))

    def upload_dir(self, local_dir: str | os.PathLike, path: str) -> list[str]:
        """Copy every file under ``local_dir`` to ``path`` (e.g. after ``save_pretrained`` into a temporary
        directory); returns the relative names copied. Call ``mark_complete(path, ...)`` afterwards."""
        local_dir = Path(local_dir)
        names = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
        for name in names:
            self.put_file(local_dir / name, f"{path}/{name}")
        return names

    def download_dir(self, path: str, local_dir: str | os.PathLike) -> list[str]:
        """Copy every file under ``path`` (completion marker included) into ``local_dir``."""
        names = [name[len(clean_path(path)):].lstrip("/") for name in self.find(path)]
        for name in names:
            target = Path(local_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            self.get_file(f"{path}/{name}", target)
        return names

    @contextmanager
    def recording(self, prefix: str, skip: tuple[str, ...] = ()) -> Iterator[dict[str, str]]:
        """While active, the SHA-256 of every whole file this store writes under ``prefix`` (except under the
        subdirectories ``skip``), by its path relative to ``prefix``: the checksums of what a stage wrote, taken from
        the bytes as they were written (nothing is read back). Files another library writes into the store (zarr's)
        are not seen."""
        ledger: dict[str, str] = {}
        entry = (clean_path(prefix), tuple(clean_path(s) + "/" for s in skip), ledger)
        self._ledgers.append(entry)
        try:
            yield ledger
        finally:
            self._ledgers.remove(entry)

    def _record(self, path: str, sha256: Callable[[], str]) -> None:
        path = clean_path(path)
        for prefix, skip, ledger in self._ledgers:
            relative = path[len(prefix) + 1:] if path.startswith(prefix + "/") else None
            if relative and not relative.startswith(skip) and os.path.basename(relative) != MARKER:
                ledger[relative] = sha256()

    def _write_local(self, full: str, fill: Callable[[IO[bytes]], object]) -> None:
        directory, name = os.path.split(full)
        _make_dirs_durable(directory)
        tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, full)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync(directory)

    def make_durable(self, prefix: str, name: str) -> None:
        """Persist the files called ``name`` under ``prefix`` that another library wrote into the store (zarr's
        ``zarr.json``): each file's data and its directory's entry, as this store's own writes are. An object store
        needs nothing: a PUT that returned is durable."""
        if not self.is_local:
            return
        with self.guard("persist", prefix):
            for directory, _, files in os.walk(self.full_path(prefix)):
                if name in files:
                    _fsync(os.path.join(directory, name))
                    _fsync(directory)

    def remove_temporaries(self, prefix: str, of: Callable[[str], bool] | None = None) -> int:
        """Delete the hidden temporary files that writes killed before their rename left under ``prefix`` (local
        disk; an object store has none), only those of files whose name ``of`` accepts if given; returns how many.
        Only for an artifact (or the files ``of`` names) whose writer holds its lock."""
        if not self.is_local:
            return 0
        removed = 0
        for directory, _, files in os.walk(self.full_path(prefix)):
            for name in files:
                # ".<target name>.<32 hex>.tmp", as _write_local names them
                if name.startswith(".") and name.endswith(".tmp") and (of is None or of(name[1:].rsplit(".", 2)[0])):
                    with suppress(FileNotFoundError):
                        os.unlink(os.path.join(directory, name))
                        removed += 1
        return removed

    # ---- listing and deletion ------------------------------------------------------------------------------

    def list(self, prefix: str = "") -> list[str]:
        """Relative paths of the direct children of ``prefix`` (files and directories), sorted; [] if absent.
        Hidden names (temporary files) are left out."""
        try:
            entries = self.fs.ls(self.full_path(prefix), detail=False)
        except FileNotFoundError:
            return []
        return sorted(self._relative(e) for e in entries
                      if not os.path.basename(e.rstrip("/")).startswith(".") and e.rstrip("/") != self.full_path(prefix))

    def find(self, prefix: str = "") -> list[str]:
        """Relative paths of every file under ``prefix``, sorted (hidden temporary files left out)."""
        try:
            entries = self.fs.find(self.full_path(prefix))
        except FileNotFoundError:
            return []
        return sorted(self._relative(e) for e in entries if not os.path.basename(e).startswith("."))

    def delete(self, prefix: str) -> None:
        """Delete an artifact (a file or everything under a directory). Its completion marker goes first, so an
        interrupted deletion leaves an incomplete artifact, never a complete-looking partial one."""
        full = self.full_path(prefix)
        if not clean_path(prefix):
            raise ValueError("refusing to delete the whole storage root; name an artifact")
        with self.guard("delete", prefix):
            self.unmark_complete(prefix)
            if self.fs.exists(full):
                self.fs.rm(full, recursive=True)

    # ---- completion markers --------------------------------------------------------------------------------

    def mark_complete(self, path: str, manifest: dict) -> None:
        """Declare the artifact at ``path`` finished; ``manifest`` is what ``read_manifest`` returns. Call it last."""
        self.write_json(f"{path}/{MARKER}", manifest)

    def unmark_complete(self, path: str) -> None:
        """Withdraw the marker before an artifact is rewritten or deleted."""
        marker = self.full_path(f"{path}/{MARKER}")
        with suppress(FileNotFoundError, NotADirectoryError):  # no marker, or ``path`` is a plain file
            self.fs.rm_file(marker)

    def is_complete(self, path: str) -> bool:
        return self.exists(f"{path}/{MARKER}")

    def read_manifest(self, path: str) -> dict:
        try:
            return self.read_json(f"{path}/{MARKER}")
        except FileNotFoundError:
            raise IncompleteArtifactError(f"{self.url(path)} is not complete (no {MARKER}): the stage that writes it "
                                          "never finished; rerun it") from None

    # ---- zarr ----------------------------------------------------------------------------------------------

    def zarr_store(self, path: str, read_only: bool = False):
        """A Zarr v3 store rooted at ``path``: ``zarr.open_group(store.zarr_store(path))``."""
        import zarr

        if self.is_local:
            return zarr.storage.LocalStore(self.full_path(path), read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url(path), storage_options=self.storage_options,
                                                 read_only=read_only)


def _file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _copy_stream(src: IO[bytes], dst: IO[bytes], block: int = 16 << 20) -> None:
    while chunk := src.read(block):
        dst.write(chunk)


_SYNC_POOL: ThreadPoolExecutor | None = None
_SYNC_POOL_LOCK = threading.Lock()


def _sync_pool() -> ThreadPoolExecutor:
    """Threads for concurrent local writes (``write_many``), shared by every store and caller of this process: they
    wait on the disk, so more threads than cores is right."""
    global _SYNC_POOL
    with _SYNC_POOL_LOCK:
        if _SYNC_POOL is None:
            _SYNC_POOL = ThreadPoolExecutor(max_workers=32, thread_name_prefix="store-write")
        return _SYNC_POOL


def _forget_sync_pool() -> None:
    # A forked child inherits the pool object but none of its threads; an executor that believes it has idle threads
    # would queue work nobody runs. The child starts its own on first use.
    global _SYNC_POOL, _SYNC_POOL_LOCK
    _SYNC_POOL, _SYNC_POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_sync_pool)


def _make_dirs_durable(directory: str) -> None:
    """``os.makedirs``, and each directory it creates persisted in its parent: a file renamed into a new directory
    is durable only once that directory's own entry is."""
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    if missing:
        os.makedirs(missing[0], exist_ok=True)
        for created in reversed(missing):
            _fsync(os.path.dirname(created))


def _fsync(path: str) -> None:
    """Persist a file's data, or a directory's entries (after a rename the directory must reach the disk too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
