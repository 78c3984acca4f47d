"""A teacher-cache writer in its own process, for the crash and concurrency tests:

    python -m tests.storage.cache_worker STORE_JSON PATH SPEC_JSON DELAY LOCK_TIMEOUT LEASE_TTL [GATE]

Prints ``ready`` once imported, then ``wrote <n>`` and exits 0, or prints the lock error and exits 3 when another
writer holds the cache. Each chunk takes DELAY seconds; with GATE (a local file), every chunk after the first also
waits until that file exists, so a test can hold the writer mid-build for as long as it needs. With CACHE_CHUNKS
(``start:stop`` in the environment) it writes only those chunks, as one of several shard writers.
"""

import json
import os
import sys
import time

from storage.cache import LockedError, TeacherCacheSpec
from tests.storage.helpers import build_cache, open_described


def pace(delay: float, gate: str | None):
    def before_chunk(chunk: int) -> None:
        time.sleep(delay)
        while gate and chunk and not os.path.exists(gate):
            time.sleep(0.02)

    return before_chunk


if __name__ == "__main__":
    store_json, path, spec_json, delay, lock_timeout, lease_ttl, *gate = sys.argv[1:]
    store = open_described(store_json)
    spec = TeacherCacheSpec.from_dict(json.loads(spec_json))
    print("ready", flush=True)
    shard = os.environ.get("CACHE_CHUNKS")
    chunks = {"chunks": range(*map(int, shard.split(":")))} if shard else {}
    try:
        wrote = build_cache(store, path, spec, pace(float(delay), gate[0] if gate else None),
                            lock_timeout=float(lock_timeout), lease_ttl=float(lease_ttl),
                            on_wait=lambda message: print(f"waiting: {message}", flush=True), **chunks)
    except LockedError as exc:
        print(f"locked: {exc}", flush=True)
        sys.exit(3)
    print(f"wrote {wrote}", flush=True)
