"""Exclusive ownership of an artifact being built, across processes and machines.

Local disk: ``flock`` on ``<path>/_lock``. The kernel drops the lock when its process dies (even by SIGKILL), so a
crashed writer never blocks the next one.

Object store: a lease object ``<path>/_lease.json`` {owner, host, pid, expires}. It is created only if absent
(``If-None-Match: *``), renewed by a heartbeat thread only if unchanged (``If-Match: <etag>``), and taken over by
another process only once expired, again with ``If-Match`` so exactly one contender wins. A writer that could not
renew in time has lost the lease and must stop (``ensure_held`` raises). Expiry compares wall clocks, so machines
sharing a bucket need clocks within a fraction of ``ttl``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path


class LockedError(RuntimeError):
    """Another process holds the lock; the message says who and what to do. ``holder`` is the lock's record of that
    process ({host, pid, ...; an object store's lease also its expiry}), when it could be read."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder


def _owner() -> dict:
    return {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    return f"process {holder.get('pid')} on {holder.get('host')}"


def waiting_message(what: str, holder: dict | None, timeout: float) -> str:
    """What a run says before it waits for another's lock: who holds it and, for a lease, when it runs out."""
    message = f"{what} is being written by {_describe(holder)}; waiting up to {timeout:.0f} s for it to finish"
    if holder and "expires" in holder:  # an object store's lease: its holder may be dead without anyone knowing
        left = holder["expires"] - time.time()
        at = time.strftime("%H:%M:%S UTC", time.gmtime(holder["expires"]))
        message += (f" (its lease runs out at {at}, in {max(left, 0):.0f} s, unless that process renews it; a crashed "
                    "holder's lease runs out by itself, and this run then takes over)")
    else:  # flock: the kernel releases it the moment its holder dies
        message += " (if that process dies, its lock is released at once)"
    return message


class FileLock:
    """``flock``-based lock for local stores."""

    def __init__(self, directory: Path, what: str):
        self.path, self.what = Path(directory) / "_lock", what
        self._fd: int | None = None

    def acquire(self, timeout: float, poll: float = 0.2) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    holder = self._holder()
                    os.close(fd)
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    raise LockedError(_locked_message(self.what, holder, timeout), holder) from None
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_owner()).encode())
        self._fd = fd

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def ensure_held(self) -> None:
        if self._fd is None:
            raise LockedError(f"the lock on {self.what} is not held")

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class ObjectLease:
    """Expiring lease for object stores, renewed in the background while held.

    ``ensure_held`` fails once the last successful renewal is older than most of the ttl, even before the heartbeat
    notices a takeover: a writer that hung, or whose renewals kept failing on the network, may have lost the lease
    to a contender that saw it expire, and must not record anything more."""

    HELD_FRACTION = 0.9  # of the ttl after a renewal began: the margin covers that request's own latency

    def __init__(self, store, path: str, what: str, ttl: float = 120.0):
        from . import s3  # imported here: s3fs is slow to import and local stores never need it

        self._s3 = s3
        self.fs, self.what, self.ttl = store.fs, what, ttl
        self.bucket, _, self.key = store.full_path(f"{path}/_lease.json").partition("/")
        self.record = _owner()
        self.etag: str | None = None
        self._held_until = 0.0  # time.monotonic() until which the last successful write surely keeps the lease
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.record, "ttl": self.ttl, "expires": time.time() + self.ttl}).encode()

    def _write(self, put, *args) -> None:
        """A conditional write of the lease: on success the new etag, and how long the lease is surely ours."""
        started = time.monotonic()
        self.etag = put(self.fs, self.bucket, self.key, self._body(), *args)
        self._held_until = started + self.HELD_FRACTION * self.ttl

    def acquire(self, timeout: float, poll: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while True:
            started = time.monotonic()
            try:
                self._write(self._s3.put_if_absent)
                break
            except self._s3.PreconditionFailed:
                pass
            current = self._s3.get_with_etag(self.fs, self.bucket, self.key)
            holder = json.loads(current[0]) if current else None
            if self._adopt(current, started):  # the create succeeded; a retry of it was refused
                break
            if current and holder.get("expires", 0) < time.time():  # stale: its writer died or hung
                try:
                    self._write(self._s3.put_if_match, current[1])
                    break
                except self._s3.PreconditionFailed:
                    pass  # someone else took it (or renewed it) first
            if time.monotonic() >= deadline:
                raise LockedError(_locked_message(self.what, holder, timeout), holder)
            time.sleep(poll)
        self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _adopt(self, current: tuple[bytes, str] | None, started: float) -> bool:
        """After a refused conditional write: whether the lease object is this lease's own (then its ETag is taken).

        A write whose response was lost (a timeout, a reset connection) is retried by the S3 client with the same
        condition, and the retry is refused because the first attempt succeeded: a refusal alone does not mean that
        another process holds the lease. Only the write begun at ``started`` can have stored this owner since."""
        if current is None or json.loads(current[0]).get("owner") != self.record["owner"]:
            return False
        self.etag, self._held_until = current[1], started + self.HELD_FRACTION * self.ttl
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            started = time.monotonic()
            try:
                try:
                    self._write(self._s3.put_if_match, self.etag)
                except self._s3.PreconditionFailed:
                    if not self._adopt(self._s3.get_with_etag(self.fs, self.bucket, self.key), started):
                        self._lost.set()
                        return
            except Exception:  # a transient network error: retry at the next beat, the ttl leaves room
                continue

    def ensure_held(self) -> None:
        if self._lost.is_set() or self.etag is None:
            raise LockedError(f"lost the lease on {self.what}: another process took it over after this one failed "
                              f"to renew it within {self.ttl:.0f} s; stop writing and rerun")
        if time.monotonic() > self._held_until:
            raise LockedError(f"the lease on {self.what} was last renewed more than {self.HELD_FRACTION * self.ttl:.3g} "
                              f"s ago, near its ttl of {self.ttl:.3g} s (this process hung, or its renewals failed): "
                              "another process may hold it now; stop writing and rerun")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.etag is not None and not self._lost.is_set():
            try:
                self._s3.delete_if_match(self.fs, self.bucket, self.key, self.etag)
            except self._s3.PreconditionFailed:
                pass
        self.etag = None


def _locked_message(what: str, holder: dict | None, timeout: float) -> str:
    return (f"{what} is being written by {_describe(holder)} (waited {timeout:.0f} s); wait for it to finish and "
            "rerun (what it finished will be reused), or stop that process")


def acquire_lock(store, path: str, what: str, timeout: float, ttl: float = 120.0, on_wait=None):
    """Take the exclusive lock on the artifact at ``path`` (waiting up to ``timeout`` s); returns an object with
    ``ensure_held()`` and ``release()``. If another process holds it, ``on_wait(message)`` is called once before
    waiting for it."""
    lock = FileLock(store.local_path(path), what) if store.is_local else ObjectLease(store, path, what, ttl)
    try:
        lock.acquire(0.0)
        return lock
    except LockedError as exc:
        if timeout <= 0:
            raise
        holder = exc.holder
    if on_wait is not None:
        on_wait(waiting_message(what, holder, timeout))
    lock.acquire(timeout)
    return lock


@contextmanager
def holding_lock(store, path: str, what: str, timeout: float, ttl: float = 120.0, on_wait=None):
    """``acquire_lock`` for the duration of a ``with`` block (released however the block ends)."""
    lock = acquire_lock(store, path, what, timeout, ttl, on_wait)
    try:
        yield lock
    finally:
        lock.release()
