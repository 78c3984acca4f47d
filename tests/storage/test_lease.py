"""The object-store lease against a real S3 API (moto's server). A conditional write whose response was lost (a
timeout, a reset connection) is retried by the S3 client with the same condition, and the retry is refused because
the first attempt succeeded: the lease must not take that refusal for another process holding it."""

import json

from storage import s3
from storage.lease import ObjectLease


def stored_owner(store, path: str) -> str:
    return json.loads(store.read_bytes(f"{path}/_lease.json"))["owner"]


def test_a_renewal_that_succeeded_but_was_refused_on_retry_keeps_the_lease(s3_store):
    lease = ObjectLease(s3_store, "cache", "the cache", ttl=1.0)  # renewed every 0.25 s
    lease.acquire(timeout=5)
    # A renewal reached S3 and its answer was lost: the object changed while the lease kept the old ETag, so its next
    # conditional write is refused as the client's retry was.
    s3.put_if_match(lease.fs, lease.bucket, lease.key, lease._body(), lease.etag)
    lease._stop.wait(1.5)  # beats past the ttl: held now only if renewals went on after the refusal
    lease.ensure_held()
    assert stored_owner(s3_store, "cache") == lease.record["owner"]
    lease.release()
    assert not s3_store.exists("cache/_lease.json")  # released, not left to expire


def test_a_create_that_succeeded_but_was_refused_on_retry_takes_the_lease(s3_store):
    lease = ObjectLease(s3_store, "cache", "the cache", ttl=60.0)
    s3.put_if_absent(lease.fs, lease.bucket, lease.key, lease._body())  # the create landed; its answer was lost
    lease.acquire(timeout=2)  # not "being written by process <this one>" after waiting, nor after the ttl
    lease.ensure_held()
    lease.release()
    assert not s3_store.exists("cache/_lease.json")
