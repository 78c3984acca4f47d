"""The stage task's function called directly (``.fn``): it returns a small typed manifest and reuses finished work;
the result storage block over the artifact root."""

import json
import math
import uuid

import pytest
from safetensors.torch import load_file

import logging

from distill.plan import plan_run
from storage import ArtifactStore
from tasks.result_storage import result_storage
from tasks.stage import stage_task

from ..storage.conftest import CREDENTIALS, make_bucket, s3_endpoint  # noqa: F401 (s3_endpoint: fixture)
from .conftest import TINY, tiny_overrides

pytestmark = pytest.mark.usefixtures("prefect_harness")


def plan(tiny_teacher, root, flow="self-distill", **overrides):
    return plan_run(flow, TINY, tiny_overrides(tiny_teacher, root, **overrides), logging.getLogger())[0]


def test_stage_task_functions_return_small_manifests(tiny_teacher, tmp_path):
    run = plan(tiny_teacher, tmp_path)
    cfg = run.config
    tokens = stage_task.fn(run, "tokenize", {})
    trained = stage_task.fn(run, "self_distill", {"tokens": tokens})
    for manifest in (tokens, trained):
        assert len(manifest.model_dump_json()) < 20_000  # paths and numbers, never tensors
    assert tokens.splits["train"].rows == cfg.data.max_train_rows
    assert trained.steps == cfg.train.steps and trained.num_patched == 14
    assert (tmp_path / trained.weights).stat().st_size > 0
    stored = {p: p.stat().st_mtime_ns for p in (tmp_path / tokens.path).rglob("*")}
    assert any(p.suffix == ".parquet" for p in stored)
    assert stage_task.fn(run, "tokenize", {}) == tokens  # finished: returned as stored...
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / tokens.path).rglob("*")} == stored  # ...and no work


@pytest.mark.parametrize("signal", ["online", "cache"])
def test_self_distill_trains_every_loss_term_from_either_teacher_signal(tiny_teacher, tmp_path, signal):
    every_term = {"self_distill.ce_weight": 1.0, "self_distill.hidden_weight": 1.0,
                  "self_distill.magnitude_weight": 0.1, "self_distill.teacher_signal": signal,
                  "cache.layers": [1, 2],  # the cached signal needs every hidden state it matches
                  "cache.eval_samples": 4}
    run = plan(tiny_teacher, tmp_path, **every_term)
    cfg = run.config
    tokens = stage_task.fn(run, "tokenize", {})
    cache = stage_task.fn(run, "teacher_cache", {"tokens": tokens}) if signal == "cache" else None
    trained = stage_task.fn(run, "self_distill", {"tokens": tokens, "cache": cache})
    if cache is not None:  # its held-out rows are a cache setting of their own, not the evaluation's
        assert (cache.splits["eval"].rows, cfg.eval.max_rows) == (4, 8)
    history = json.loads((tmp_path / trained.history).read_text())
    assert len(history) == cfg.train.steps
    for record in history:
        assert {"ce", "kl", "hidden"} <= set(record)
        assert record["loss"] == pytest.approx(record["ce"] + record["kl"] + record["hidden"], rel=1e-5)
        assert all(math.isfinite(record[k]) and record[k] >= 0 for k in ("ce", "kl", "hidden"))
    deltas = load_file(tmp_path / trained.weights)  # dW of every patched layer, zero before training
    assert len(deltas) >= trained.num_patched and all(bool(t.abs().max() > 0) for t in deltas.values())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_result_storage_is_a_folder_of_the_artifact_root_without_credentials(where, tmp_path, request,
                                                                                 monkeypatch):
    if where == "s3":  # the options as a configuration gives them: region at the top level, as the store takes it
        options = {"endpoint_url": request.getfixturevalue("s3_endpoint"), "region": "us-east-1"}
        credentials = {"key": CREDENTIALS["key"], "secret": CREDENTIALS["secret"]}
        root = f"s3://{make_bucket({**options, **CREDENTIALS})}/artifacts"
        store = ArtifactStore(root, storage_options={**options, **credentials})
        # the block holds no credentials: the process running the flow has them in its environment
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", credentials["key"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", credentials["secret"])
    else:
        store = ArtifactStore(str(tmp_path / "artifacts"))
    block = result_storage(store)
    assert "secret" not in json.dumps(block.model_dump(mode="json"))  # credentials stay out of the server's database
    failed, cached = uuid.uuid4().hex, "tokenize/0123456789abcdef.json"  # as Prefect names each
    for key in (failed, cached):
        block.write_path(key, key.encode())
        assert block.read_path(key) == key.encode()
    assert sorted(store.find()) == sorted([f"prefect/{failed}", f"prefect/{cached}"])
