"""A real Prefect server for the deployment tests, set up the way the README's "Run it on a Prefect server" does:
`prefect server start` on a free 127.0.0.1 port with its own PREFECT_HOME, the process work pool, and the
repository's own prefect.yaml deployed with `prefect --no-prompt deploy --all`.

Every process started here is stopped by pid, with its process group and its descendants (Prefect starts each flow
run in a session of its own), even when a test fails or times out.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from ..pipeline.conftest import TINY
from ..pipeline.tiny_teacher import build_tiny_teacher
from ..storage.conftest import CREDENTIALS, free_port, make_bucket, s3_endpoint  # noqa: F401 (s3_endpoint: fixture)

REPO = Path(__file__).resolve().parents[2]
POOL = yaml.safe_load((REPO / "prefect.yaml").read_text())["definitions"]["work_pool"]["name"]


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL, the process groups of ``proc`` and of every descendant of it."""
    try:
        root = psutil.Process(proc.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for member in family:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                group = os.getpgid(member.pid)
                if group != os.getpgrp():
                    os.killpg(group, sig)
        _, family = psutil.wait_procs(family, timeout=grace)
        if not family:
            break
    proc.wait()


@dataclass
class Server:
    """A running `prefect server start` and the environment every Prefect command of the tests runs with."""

    api: str
    env: dict[str, str]

    def cli(self, *args: str, timeout: float = 600, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        """Run ``prefect ARGS`` from the repository root; ``stdout`` holds stdout and stderr together."""
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen([sys.executable, "-m", "prefect", *args], cwd=REPO, env={**self.env, **env},
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            status = "exited with"
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                status = f"ran past {timeout:.0f} s and was stopped,"
            finally:
                stop(proc)
            out.seek(0)
            output = out.read().decode(errors="replace")
        if proc.returncode != 0 and check:
            pytest.fail(f"prefect {' '.join(args)} {status} {proc.returncode}:\n{output[-4000:]}")
        return subprocess.CompletedProcess(args, proc.returncode, output)

    def run_deployment(self, name: str, overrides: dict, config: str = TINY) -> str:
        """`prefect deployment run NAME --param config=... --params '{"overrides": ...}'`; the flow run's id."""
        output = self.cli("deployment", "run", name, "--param", f"config={config}",
                          "--params", json.dumps({"overrides": overrides}))
        return re.search(r"UUID: ([0-9a-f-]{36})", output.stdout).group(1)

    def api_call(self, method: str, path: str, body: dict | None = None):
        response = httpx.request(method, f"{self.api}{path}", json=body, timeout=60)
        response.raise_for_status()
        return response.json()

    def flow_run(self, flow_run_id: str) -> dict:
        return self.api_call("GET", f"/flow_runs/{flow_run_id}")

    def artifacts(self, flow_run_id: str) -> dict[str, dict]:
        """The keyed artifacts of a flow run (its tasks' included), by key."""
        found = self.api_call("POST", "/artifacts/filter",
                              {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
        return {artifact["key"]: artifact for artifact in found if artifact["key"]}

    def task_runs(self, flow_run_id: str) -> list[dict]:
        return self.api_call("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200})


def wait_until_healthy(api: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server start exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{api}/health", timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise TimeoutError(f"the Prefect server at {api} was not healthy after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def client_env(home: Path, api: str) -> dict[str, str]:
    """The test session's environment, with no AWS credentials from the machine (tests pass their own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PWD": str(REPO),  # what the shell sets; prefect.yaml's pull step reads it at deploy time
            "COLUMNS": "200",  # keep Rich from wrapping the messages the tests read
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
            "AWS_CONFIG_FILE": str(home / "no-aws-config"), "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """`prefect server start`, the work pool and both deployments of prefect.yaml; stopped after the session."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    api = f"http://127.0.0.1:{free_port()}/api"
    env = client_env(home, api)
    # The nightly schedule is checked on the deployment; the scheduler service would also queue tonight's run of
    # the real-use preset in the pool that the tests' worker polls.
    server_env = {**env, "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
    log = home / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", api.split(":")[-1].removesuffix("/api")],
                                cwd=home, env=server_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until_healthy(api, proc, log)
        running = Server(api, env)
        running.cli("work-pool", "create", POOL, "--type", "process")
        running.cli("--no-prompt", "deploy", "--all")
        yield running
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    return build_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny-llama")


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:  # noqa: F811
    return make_bucket({"endpoint_url": s3_endpoint, **CREDENTIALS})


def s3_env(endpoint: str) -> dict[str, str]:
    """The AWS environment variables a worker reads (storage/s3.py for the artifacts, s3fs for Prefect's results)."""
    return {"AWS_ACCESS_KEY_ID": CREDENTIALS["key"], "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret"],
            "AWS_DEFAULT_REGION": CREDENTIALS["region"], "AWS_ENDPOINT_URL": endpoint}

