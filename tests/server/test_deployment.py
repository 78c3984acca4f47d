"""The repository's prefect.yaml against a real `prefect server start`: deploy, run on a worker, read the run's
state and UI artifacts back through the API; the same deployment on S3 (moto's server); bad input at the edges."""

import re
from pathlib import Path

import boto3
import pytest

from ..pipeline.conftest import tiny_overrides
from .conftest import CREDENTIALS, POOL, s3_env

pytestmark = pytest.mark.slow

NIGHTLY = "superposition-distill/nightly"
MANUAL = "self-distill/manual"
# the quickstart preset reduced to a handful of steps on a few rows
QUICKSTART_IN_SECONDS = {"data.max_train_rows": 64, "data.max_eval_rows": 16, "cache.max_samples": 32,
                         "train.steps": 4, "train.warmup_steps": 1, "train.eval_every": 2, "train.checkpoint_every": 2,
                         "head.steps": 2, "eval.max_rows": 16, "eval.max_new_tokens": 4}


def assert_completed_with_report(server, flow_run_id: str, output: str, run_name: str = "tiny") -> dict:
    state = server.flow_run(flow_run_id)["state"]
    assert state["type"] == "COMPLETED", f"{state['name']}: {state['message']}\n{output[-4000:]}"
    artifacts = server.artifacts(flow_run_id)
    report, metrics = (f"superposition-distill-{run_name}-{kind}" for kind in ("report", "metrics"))
    assert artifacts[report]["type"] == "markdown" and artifacts[report]["data"].startswith("# ")
    assert artifacts[metrics]["type"] == "table" and "perplexity" in artifacts[metrics]["data"]
    return artifacts


def test_prefect_yaml_deploys_a_nightly_schedule_and_a_manual_deployment(server):
    nightly = server.api_call("GET", f"/deployments/name/{NIGHTLY}")
    [schedule] = nightly["schedules"]
    assert schedule["active"] and schedule["schedule"] == {"cron": "0 2 * * *", "timezone": "UTC", "day_or": True}
    assert nightly["global_concurrency_limit"]["limit"] == 1
    manual = server.api_call("GET", f"/deployments/name/{MANUAL}")
    assert manual["schedules"] == []
    for deployment in (nightly, manual):
        assert deployment["work_pool_name"] == POOL
        assert deployment["parameters"] == {"config": "tinyllama", "overrides": {}}
    on_ray = server.api_call("GET", "/deployments/name/superposition-distill/ray")
    assert on_ray["schedules"] == [] and on_ray["work_pool_name"] == POOL
    assert on_ray["parameters"]["overrides"] == {"compute.backend": "ray", "compute.ray.address": "auto",
                                                 "compute.ray.workers": 2}
    assert server.api_call("GET", f"/work_pools/{POOL}")["type"] == "process"


def test_nightly_deployment_runs_the_quickstart_on_a_worker(server, tmp_path):
    overrides = {"storage.root": str(tmp_path), **QUICKSTART_IN_SECONDS}
    flow_run_id = server.run_deployment(NIGHTLY, overrides, config="quickstart")
    worker = server.cli("worker", "start", "--pool", POOL, "--run-once", check=False)
    artifacts = assert_completed_with_report(server, flow_run_id, worker.stdout, run_name="quickstart")
    assert "superposition-distill-quickstart-student" in artifacts
    # the report's link has its own key, not the markdown report's
    report_link = artifacts["superposition-distill-quickstart-report-md"]["data"]
    assert re.search(r"/evaluate-[0-9a-f]{10}/report\.md\)", report_link)
    for key in ("checkpoints", "student-checkpoints"):  # the LM head's and the student's: "[name](<directory>)"
        link = artifacts[f"superposition-distill-quickstart-{key}"]["data"]
        assert list(Path(link.partition("](")[2].removesuffix(")")).glob("step-*"))
    assert list(tmp_path.glob("runs/quickstart-superposition-*/evaluate-*/report.md"))


def test_nightly_deployment_with_artifacts_and_results_on_s3(server, tiny_teacher, s3_endpoint, s3_bucket):
    root = f"s3://{s3_bucket}/bitnet-distill"
    flow_run_id = server.run_deployment(NIGHTLY, tiny_overrides(tiny_teacher, root, **{"train.steps": 4}))
    run = server.cli("flow-run", "execute", flow_run_id, check=False, **s3_env(s3_endpoint))
    artifacts = assert_completed_with_report(server, flow_run_id, run.stdout)
    assert f"({root}/runs/tiny-superposition-" in artifacts["superposition-distill-tiny-student"]["data"]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=CREDENTIALS["key"],
                      aws_secret_access_key=CREDENTIALS["secret"], region_name=CREDENTIALS["region"])
    keys = [obj["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
            for obj in page.get("Contents", [])]
    assert any(re.search(r"/evaluate-[0-9a-f]{10}/report\.md$", key) for key in keys)
    # Prefect's cached results live there too, one per stage, beside the stages
    assert any(re.fullmatch(r"bitnet-distill/prefect/tokenize/[0-9a-f]{16}\.json", key) for key in keys), keys


def test_unknown_or_mistyped_parameter_is_refused_when_the_run_is_created(server):
    unknown = server.cli("deployment", "run", NIGHTLY, "--param", "steps=5", check=False)
    assert unknown.returncode != 0
    assert "specified but not found on the deployment: 'steps'" in unknown.stdout
    assert "available on the deployment: 'config', 'overrides'" in unknown.stdout
    mistyped = server.cli("deployment", "run", NIGHTLY, "--params", '{"overrides": "train.steps=5"}', check=False)
    assert mistyped.returncode != 0 and "Validation failed for field 'overrides'" in mistyped.stdout


def test_bad_input_fails_the_run_before_any_stage_with_the_reason_as_its_state_message(
        server, tiny_teacher, tmp_path, s3_endpoint, s3_bucket):
    cases = {  # overrides -> what the UI must show as the failure reason
        "missing teacher": ({"teacher.name_or_path": str(tmp_path / "no-such-teacher")},
                            f"ConfigError: teacher.name_or_path: {tmp_path / 'no-such-teacher'} does not exist"),
        "Hub dataset offline": ({"data.builtin": None, "data.dataset": "roneneldan/TinyStories"},
                                "ConfigError: cannot load dataset 'roneneldan/TinyStories'"),
        "misspelt key": ({"train.stepz": 5}, "ConfigError: invalid configuration: train.stepz: Extra inputs"),
        "S3 without credentials": ({"storage.root": f"s3://{s3_bucket}/x",
                                    "storage.storage_options": {"endpoint_url": s3_endpoint}},
                                   f"StoreError: no AWS credentials for s3://{s3_bucket}/x: set AWS_ACCESS_KEY_ID"),
    }
    runs = {name: server.run_deployment(MANUAL, tiny_overrides(tiny_teacher, tmp_path / "artifacts", **overrides))
            for name, (overrides, _) in cases.items()}
    worker = server.cli("worker", "start", "--pool", POOL, "--run-once", check=False)  # runs all four at once
    for name, (_, message) in cases.items():
        state = server.flow_run(runs[name])["state"]
        assert state["type"] == "FAILED" and message in state["message"], f"{name}: {state}\n{worker.stdout[-3000:]}"
        assert server.task_runs(runs[name]) == [], f"{name}: a stage started"
    assert "Hugging Face Hub" in server.flow_run(runs["Hub dataset offline"])["state"]["message"]
    assert not (tmp_path / "artifacts").exists()
