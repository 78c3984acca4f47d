"""Storage test fixtures: local temporary directories and a real S3 API (moto's server on 127.0.0.1), reached over
HTTP through s3fs by the same code path as AWS or MinIO."""

from __future__ import annotations

import logging
import os
import socket
import uuid

import pytest

from storage import ArtifactStore

CREDENTIALS = {"key": "testing", "secret": "testing", "region": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    # moto and boto3 are imported where used: the local-store tests (the CUDA ones on a GPU host among them) run
    # without the dev extra's S3 stack
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_options(s3_endpoint) -> dict:
    return {"endpoint_url": s3_endpoint, **CREDENTIALS}


def make_bucket(options: dict) -> str:
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id=options["key"],
                          aws_secret_access_key=options["secret"], region_name=options["region"])
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_store(s3_options) -> ArtifactStore:
    return ArtifactStore(f"s3://{make_bucket(s3_options)}/artifacts", storage_options=s3_options)


@pytest.fixture
def local_store(tmp_path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "store"))


@pytest.fixture(params=["local", "s3"])
def store(request) -> ArtifactStore:
    """The same test against a local directory and against S3."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def fsyncs(monkeypatch):
    """Call it to start recording what each ``os.fsync`` reaches, by resolved path (the OS call itself still runs);
    returns the list it appends to."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("names an fd's file through /proc")

    def start() -> list[str]:
        synced: list[str] = []
        fsync = os.fsync

        def recording_fsync(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            fsync(fd)

        monkeypatch.setattr(os, "fsync", recording_fsync)
        return synced

    return start
