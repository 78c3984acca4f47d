"""Prefect's result storage: blocks over the artifact root, where each stage's cached result lives in its own
directory (``tasks/common.py``) and failed tasks' records in ``prefect-failures/``."""

from __future__ import annotations

import hashlib
import re

from prefect.filesystems import LocalFileSystem, RemoteFileSystem

from storage import ArtifactStore

SECRETS = ("key", "secret", "token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token")

# Prefect persists a failed task's exception too, under a random key (a uuid4's hex digits) at the top of the result
# storage, where every cache key is a stage's path; the artifact root's blocks keep those records in one folder.
FAILED_RESULTS = "prefect-failures"
_RANDOM_KEY = re.compile(r"[0-9a-f]{32}")


class _FailuresInOneFolder:
    """Maps Prefect's random keys into ``prefect-failures/``, for writes and reads alike; every other path as is."""

    def _resolve_path(self, path):
        if path is not None and _RANDOM_KEY.fullmatch(str(path)):
            path = f"{FAILED_RESULTS}/{path}"
        return super()._resolve_path(path)


class LocalArtifactRoot(_FailuresInOneFolder, LocalFileSystem):
    """Prefect's ``LocalFileSystem`` over a local artifact root, failed tasks' records under ``prefect-failures/``."""

    _block_type_name = "bitnet-distill Local Artifact Root"


class RemoteArtifactRoot(_FailuresInOneFolder, RemoteFileSystem):
    """Prefect's ``RemoteFileSystem`` over an ``s3://`` (any fsspec) root, failed tasks' records under
    ``prefect-failures/``."""

    _block_type_name = "bitnet-distill Remote Artifact Root"


def result_storage(store: ArtifactStore):
    """A Prefect filesystem block over the artifact store's root (a local path or ``s3://``).

    Prefect needs cached results' storage saved server-side, so the block is saved under a name derived from the
    root. It takes the store's S3 options as s3fs takes them (``region`` and the AWS aliases normalised, the
    endpoint and region from the environment included); credentials are left out of it (they would sit in the
    server's database): s3fs reads them from the standard AWS environment variables of whichever process runs the
    flow.
    """
    if store.is_local:
        block = LocalArtifactRoot(basepath=store.root)
    else:
        options = {k: v for k, v in store.storage_options.items() if k not in SECRETS}
        if "client_kwargs" in options:
            options["client_kwargs"] = {k: v for k, v in options["client_kwargs"].items() if k not in SECRETS}
        block = RemoteArtifactRoot(basepath=store.root, settings=options)
    name = "bitnet-distill-results-" + hashlib.sha256(store.root.encode()).hexdigest()[:12]
    block.save(name, overwrite=True)
    return block
