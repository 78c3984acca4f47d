"""The self-distillation training stage: with activation checkpointing it trains exactly the run without it; its
LoRA patch starts from the run's seed; a float16 teacher trains with loss scaling."""

import logging
import math

import torch

from distill.config import load_config
from distill.plan import plan_run
from distill.stage import execute
from distill.stages import STAGES
from distill.stages.self_distill import load_dual
from distill.teacher import Teacher
from storage.tensors import read_tensors

from .conftest import TINY, tiny_overrides


def train(tiny_teacher, root, **overrides):
    run, store = plan_run("self-distill", TINY, tiny_overrides(tiny_teacher, root, **overrides), logging.getLogger())
    tokens = execute(STAGES["tokenize"], run.context("tokenize"))
    manifest = execute(STAGES["self_distill"], run.context("self_distill"), tokens=tokens)
    return (store.read_json(manifest.history), read_tensors(store, manifest.weights),
            run.stages["self_distill"].fingerprint)


def test_activation_checkpointing_trains_the_same_student_bit_for_bit(tiny_teacher, tmp_path, caplog):
    loss = {"self_distill.ce_weight": 0.5, "self_distill.hidden_weight": 1.0, "train.steps": 4}
    plain = train(tiny_teacher, tmp_path / "plain", **loss)
    caplog.set_level(logging.INFO, logger="bitnet_distill")
    checkpointed = train(tiny_teacher, tmp_path / "checkpointed",
                         **{**loss, "self_distill.activation_checkpointing": True})
    assert "activation checkpointing of 2 transformer blocks" in caplog.text  # the run's log says it is on
    assert [h["loss"] for h in plain[0]] == [h["loss"] for h in checkpointed[0]]
    assert plain[1].keys() == checkpointed[1].keys() and plain[1]
    assert all(torch.equal(plain[1][k], checkpointed[1][k]) for k in plain[1])
    assert plain[2] == checkpointed[2]  # and it is the same run: a run may resume with the setting switched


def test_lora_starts_from_the_runs_seed_whatever_the_process_drew_before(tiny_teacher, tmp_path):
    def lora_a(seed: int) -> torch.Tensor:
        torch.rand(7)  # an earlier run in the same process (a served flow) moved the global generator on
        cfg = load_config(TINY, tiny_overrides(tiny_teacher, tmp_path, seed=seed, **{"self_distill.delta": "lora:4"}))
        dual = load_dual(cfg, Teacher(cfg.teacher), torch.device("cpu"))
        return torch.cat([layer.delta.lora_A.detach().flatten() for layer in dual.layers.values()])

    first = lora_a(0)
    assert torch.equal(first, lora_a(0)) and not torch.equal(first, lora_a(1))


def test_a_float16_teacher_trains_its_patch_with_loss_scaling(tiny_teacher, tmp_path):
    history, weights, _ = train(tiny_teacher, tmp_path / "fp16", **{"teacher.dtype": "float16", "train.steps": 2})
    assert [h["loss_scale"] for h in history] == [2.0 ** 16] * 2 and all(math.isfinite(h["loss"]) for h in history)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() and w.abs().sum() > 0 for w in weights.values())
    history, _, _ = train(tiny_teacher, tmp_path / "fp32", **{"teacher.dtype": "float32", "train.steps": 2})
    assert "loss_scale" not in history[0]
