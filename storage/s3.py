"""S3 specifics of the artifact store: options from configuration or the AWS environment, a fail-fast check
that turns botocore's errors into messages naming the URL and the fix, and conditional writes for leases.

Everything goes through s3fs, so moto, MinIO and AWS S3 take the very same code path; only the endpoint differs.
"""

from __future__ import annotations

import difflib
import inspect
import os
import uuid
from typing import Any

import s3fs
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError

from .errors import StoreError

# botocore's own names for the same settings, accepted so a config can be copied from boto3 code.
_ALIASES = {"aws_access_key_id": "key", "aws_secret_access_key": "secret", "aws_session_token": "token"}


def s3_options(storage_options: dict | None) -> dict[str, Any]:
    """s3fs keyword arguments: ``storage_options`` first, then the standard AWS environment variables.

    ``endpoint_url`` and ``region`` may be given at the top level (or inside ``client_kwargs``); without them
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` apply. Credentials
    not given here come from botocore's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, ...).
    """
    opts = {_ALIASES.get(k, k): v for k, v in (storage_options or {}).items()}
    client_kwargs = dict(opts.pop("client_kwargs", None) or {})
    endpoint = (opts.pop("endpoint_url", None) or client_kwargs.pop("endpoint_url", None)
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    region = (opts.pop("region", None) or opts.pop("region_name", None) or client_kwargs.pop("region_name", None)
              or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
    _check_known(opts)
    if endpoint:
        opts["endpoint_url"] = endpoint
    if region:
        client_kwargs["region_name"] = region
    # Listings are never cached: completion markers and leases written by other processes must be seen at once.
    opts.setdefault("use_listings_cache", False)
    return {**opts, "client_kwargs": client_kwargs}


# What s3fs.S3FileSystem passes to the fsspec layers below it; the rest of its unnamed options go to aiobotocore's
# session (profile, ...). Anything else fails deep inside aiobotocore, at the first request.
_FSSPEC_OPTIONS = {"use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache", "batch_size"}


def _check_known(opts: dict) -> None:
    from aiobotocore.session import AioSession

    named = (set(inspect.signature(s3fs.S3FileSystem.__init__).parameters)
             | set(inspect.signature(AioSession.__init__).parameters))
    known = named - {"self", "kwargs"} | _FSSPEC_OPTIONS
    unknown = sorted(set(opts) - known)
    if unknown:
        hints = {k: difflib.get_close_matches(k, sorted(known | {"endpoint_url", "region"}), n=1) for k in unknown}
        named = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise StoreError(f"storage.storage_options: unknown option {named} for an s3:// root; s3fs takes "
                         "endpoint_url, region, key, secret, token, anon, client_kwargs, config_kwargs, ...")


def open_s3(options: dict) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(**options)


def _probe_fs(options: dict) -> s3fs.S3FileSystem:
    """A filesystem that fails in seconds: one attempt, short timeouts (the working one keeps botocore's retries)."""
    config = {**options.get("config_kwargs", {}), "retries": {"max_attempts": 1, "mode": "standard"},
              "connect_timeout": 5, "read_timeout": 20}
    return s3fs.S3FileSystem(**{**options, "config_kwargs": config}, skip_instance_cache=True)


def check_s3(url: str, bucket: str, prefix: str, options: dict, writable: bool) -> None:
    """Raise ``StoreError`` unless the bucket is reachable, exists, and (if ``writable``) accepts writes."""
    fs = _probe_fs(options)
    endpoint = options.get("endpoint_url") or "the default AWS endpoint"
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
        if writable:
            probe = f"{prefix}/.write-probe-{uuid.uuid4().hex}".lstrip("/")
            fs.call_s3("put_object", Bucket=bucket, Key=probe, Body=b"")
            fs.call_s3("delete_object", Bucket=bucket, Key=probe)
    except EndpointConnectionError as exc:
        raise StoreError(f"cannot reach the S3 endpoint {endpoint} for {url} ({exc}); start the server or fix "
                         "endpoint_url in storage_options (or AWS_ENDPOINT_URL)") from None
    except (NoCredentialsError, PartialCredentialsError):
        raise StoreError(f"no AWS credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or key "
                         "and secret in storage_options (anon: true for a public bucket)") from None
    except FileNotFoundError:
        raise StoreError(f"bucket {bucket!r} does not exist at {endpoint} (root {url}); create it (e.g. "
                         f"`aws s3 mb s3://{bucket}`) or fix the storage root") from None
    except PermissionError as exc:
        what = "write to" if writable else "read"
        raise StoreError(f"access denied: cannot {what} {url} ({exc}); check the credentials and the bucket "
                         "policy, or choose a root you may write to") from None
    except ClientError as exc:  # anything else the server refused
        raise StoreError(f"S3 refused access to {url}: {exc}") from None


# Conditional writes (S3 "If-None-Match: *" / "If-Match: <etag>", supported by AWS since 2024, MinIO and moto):
# the only atomic compare-and-set an object store offers, which is what a lease needs.

_LOST_RACE = ("PreconditionFailed", "ConditionalRequestConflict")


class PreconditionFailed(Exception):
    """The object was created, changed or deleted by someone else since we last saw it."""


def _conditional(fs: s3fs.S3FileSystem, method: str, **kwargs) -> dict:
    try:
        return fs.call_s3(method, **kwargs)
    except FileExistsError:  # s3fs's translation of a failed If-None-Match
        raise PreconditionFailed() from None
    except FileNotFoundError:  # the object was deleted: it is not the one we saw either
        raise PreconditionFailed() from None
    except (OSError, ClientError) as exc:
        cause = exc if isinstance(exc, ClientError) else exc.__cause__  # s3fs wraps other codes in OSError
        if getattr(cause, "response", {}).get("Error", {}).get("Code") in _LOST_RACE:
            raise PreconditionFailed() from None
        raise


def put_if_absent(fs: s3fs.S3FileSystem, bucket: str, key: str, body: bytes) -> str:
    """Create the object unless it exists; return its ETag. Raises ``PreconditionFailed`` if it exists."""
    return _conditional(fs, "put_object", Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]


def put_if_match(fs: s3fs.S3FileSystem, bucket: str, key: str, body: bytes, etag: str) -> str:
    """Replace the object only if it still has ``etag``; return the new ETag."""
    return _conditional(fs, "put_object", Bucket=bucket, Key=key, Body=body, IfMatch=etag)["ETag"]


def get_with_etag(fs: s3fs.S3FileSystem, bucket: str, key: str) -> tuple[bytes, str] | None:
    """The object's bytes and ETag read in one request (so they belong together), or None if it is absent."""
    from fsspec.asyn import sync

    async def get() -> tuple[bytes, str]:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await response["Body"].read(), response["ETag"]
        finally:
            response["Body"].close()

    try:
        return sync(fs.loop, get)
    except FileNotFoundError:
        return None


def delete_if_match(fs: s3fs.S3FileSystem, bucket: str, key: str, etag: str) -> None:
    _conditional(fs, "delete_object", Bucket=bucket, Key=key, IfMatch=etag)
