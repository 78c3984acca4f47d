"""Task functions called directly (``.fn``): each returns a small JSON manifest and reuses finished work."""

import json

import pytest

from distill.config import load_config
from distill.plan import make_plan, preflight
from tasks import stages

from .conftest import TINY, tiny_overrides

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_stage_task_functions_return_small_manifests(tiny_teacher, tmp_path):
    cfg = load_config(TINY, tiny_overrides(tiny_teacher, tmp_path))
    plan = make_plan(cfg, "self-distill", preflight(cfg, "self-distill"))
    config = cfg.model_dump(mode="json")
    tokens = stages.tokenize.fn(config, plan["tokenize"])
    trained = stages.train_self_distill.fn(config, plan["train"], tokens, None)
    for manifest in (tokens, trained):
        assert len(json.dumps(manifest)) < 20_000  # paths and numbers, never tensors
    assert tokens["splits"]["train"]["rows"] == cfg.data.max_train_rows
    assert trained["steps"] == cfg.train.steps and trained["num_patched"] == 14
    assert (tmp_path / trained["weights"]).stat().st_size > 0
    assert stages.tokenize.fn(config, plan["tokenize"]) == tokens  # complete: returned as stored, no work
