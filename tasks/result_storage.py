"""Where Prefect keeps the stages' cached results: ``prefect/`` under the artifact root, local or ``s3://``."""

from __future__ import annotations

import hashlib

from prefect.filesystems import LocalFileSystem, RemoteFileSystem

from storage import ArtifactStore, layout

SECRETS = ("key", "secret", "token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token")


def result_storage(store: ArtifactStore):
    """A Prefect filesystem block over ``prefect/`` in the artifact store (stage results by stage path; the records
    Prefect keeps of failed tasks by their own ids).

    Prefect needs cached results' storage saved server-side, so the block is saved under a name derived from the
    root. It takes the store's S3 options as s3fs takes them (endpoint and region included); credentials are left
    out of it (they would sit in the server's database): s3fs reads them from the standard AWS environment
    variables of whichever process runs the flow.
    """
    base = store.url(layout.PREFECT_RESULTS)
    if store.is_local:
        block = LocalFileSystem(basepath=base)
    else:
        options = {k: v for k, v in store.storage_options.items() if k not in SECRETS}
        if "client_kwargs" in options:
            options["client_kwargs"] = {k: v for k, v in options["client_kwargs"].items() if k not in SECRETS}
        block = RemoteFileSystem(basepath=base, settings=options)
    block.save("bitnet-distill-results-" + hashlib.sha256(base.encode()).hexdigest()[:12], overwrite=True)
    return block
