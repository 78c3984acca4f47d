"""The superposition student's levers in the pipeline: cut out of the teacher (superposition.init: teacher) and KL to
the cached top-k logits through its own head (superposition.kl_weight); without Prefect, stage by stage."""

from __future__ import annotations

import logging

import pytest
import torch

from bitnet import SuperpositionStudent
from distill.config import ConfigError
from distill.plan import plan_run
from distill.stage import execute
from distill.stages import STAGES
from distill.stages.lm_head import head_parameters
from distill.stages.superposition import build_student
from storage.tensors import read_tensors

from .conftest import TINY, tiny_overrides

# the tiny teacher is 32 wide with heads of 8; a student half as wide keeps a decompressor (32 wide) of 2 x its width
HALF = {"student.dim": 16}


def _train(tiny_teacher, root, **overrides):
    run, _ = plan_run("superposition-distill", TINY, tiny_overrides(tiny_teacher, root, **HALF, **overrides),
                      logging.getLogger("test"))
    tokens = execute(STAGES["tokenize"], run.context("tokenize"))
    cache = execute(STAGES["teacher_cache"], run.context("teacher_cache"), tokens=tokens)
    trained = execute(STAGES["superposition"], run.context("superposition"), cache=cache)
    return run, tokens, cache, trained


def test_a_student_cut_from_the_teacher_starts_closer_and_learns_from_the_logits(tiny_teacher, tmp_path):
    _, _, _, random = _train(tiny_teacher, tmp_path)
    run, tokens, cache, cut = _train(tiny_teacher, tmp_path, **{"superposition.init": "teacher",
                                                                "superposition.kl_weight": 1.0})
    assert random.cut_from_teacher is None
    assert cut.cut_from_teacher["teacher_blocks"] == [0, 1]
    assert 0 < cut.cut_from_teacher["residual_energy_kept"] < 1
    store = run.context("superposition").store
    first = {name: store.read_json(m.history)[0] for name, m in (("random", random), ("cut", cut))}
    # the same batch at step 1: the cut student reconstructs it far better (its loss also carries the KL term)
    assert first["cut"]["cosine_loss"] < 0.5 * first["random"]["loss"]
    assert first["cut"]["logit_kl"] > 0
    head = execute(STAGES["lm_head"], run.context("lm_head"), trained=cut, tokens=tokens, cache=cache)
    assert head.trained.fingerprint == cut.fingerprint


def test_inner_layers_are_matched_through_decompressors_of_their_own(tiny_teacher, tmp_path):
    """cache.layers [1, -1]: the student reconstructs the last layer, and its first block's output the teacher's
    first; that layer's decompressor trains beside the main one and is checkpointed, and the head stage goes on."""
    run, tokens, cache, trained = _train(tiny_teacher, tmp_path, **{"cache.layers": [1, -1],
                                                                    "superposition.init": "teacher"})
    assert trained.target == "hidden/layer_2" and trained.matched == {1: 1}
    state = read_tensors(run.context("superposition").store, trained.weights)
    assert {k.split(".")[0] for k in state} == {"student", "projector", "projector_1"}
    head = execute(STAGES["lm_head"], run.context("lm_head"), trained=trained, tokens=tokens, cache=cache)
    assert head.trained.matched == {1: 1}


def test_inner_layers_may_share_the_reconstructed_layers_decompressor(tiny_teacher, tmp_path):
    run, _, _, trained = _train(tiny_teacher, tmp_path, **{"cache.layers": [1, -1], "superposition.init": "teacher",
                                                            "superposition.projectors": "shared"})
    assert trained.matched == {1: 1}
    state = read_tensors(run.context("superposition").store, trained.weights)
    assert {k.split(".")[0] for k in state} == {"student", "projector"}


def test_sampled_logits_train_the_student_and_its_head(tiny_teacher, tmp_path):
    """cache.logits: sampled: the cache holds draws instead of the top-k (a cache of its own, beside the top-k one),
    and the KL terms of the reconstruction and of the head stage read them."""
    run, tokens, cache, trained = _train(tiny_teacher, tmp_path, **{
        "cache.logits": "sampled", "superposition.kl_weight": 1.0, "head.topk_kl_weight": 1.0})
    _, _, topk_cache, _ = _train(tiny_teacher, tmp_path, **{"superposition.kl_weight": 1.0})
    assert cache.logits == "sampled" and cache.logit_arrays() == ["sampled_counts", "sampled_indices"]
    assert cache.fingerprint != topk_cache.fingerprint
    store = run.context("superposition").store
    assert store.read_json(trained.history)[0]["logit_kl"] > 0
    head = execute(STAGES["lm_head"], run.context("lm_head"), trained=trained, tokens=tokens, cache=cache)
    assert store.read_json(head.history)[0]["logit_kl"] > 0


def test_kl_through_the_teachers_head_trains_the_decompressor_to_be_read_by_it(tiny_teacher, tmp_path):
    """superposition.kl_head: teacher: the KL term reads the decompressed states through the teacher's frozen head,
    so the student's own head is left as it started, where KL through it trains it."""
    common = {"superposition.kl_weight": 1.0, "train.steps": 6}
    run, _, _, own = _train(tiny_teacher, tmp_path, **common)
    _, _, _, through_teacher = _train(tiny_teacher, tmp_path, **common, **{"superposition.kl_head": "teacher"})
    store = run.context("superposition").store
    start, _ = build_student(run.context("superposition").config, own.vocab_size, own.teacher_dim)
    heads = {name: read_tensors(store, m.weights)["student.lm_head.weight"]
             for name, m in (("own", own), ("teacher", through_teacher))}
    assert torch.equal(heads["teacher"], start.lm_head.weight) and not torch.equal(heads["own"], start.lm_head.weight)
    assert store.read_json(through_teacher.history)[0]["logit_kl"] > 0
    with pytest.raises(ConfigError, match=r"kl_head: teacher reads .*its last layer \(2\), not 1"):
        plan_run("superposition-distill", TINY, tiny_overrides(tiny_teacher, tmp_path, **{
            **common, "superposition.kl_head": "teacher", "cache.layers": [1]}), logging.getLogger("test"))


def test_sampled_logits_have_no_temperature(tiny_teacher, tmp_path):
    with pytest.raises(ConfigError, match=r"self_distill.temperature 2.0 with cache.logits: sampled"):
        plan_run("self-distill", TINY, tiny_overrides(tiny_teacher, tmp_path, **{
            "cache.logits": "sampled", "self_distill.teacher_signal": "cache", "self_distill.temperature": 2.0}),
            logging.getLogger("test"))


def test_lm_head_retraining_keeps_a_head_worth_keeping():
    torch.manual_seed(0)
    student = SuperpositionStudent(50, 16, 1, 2)
    head = student.lm_head.weight.detach().clone()
    [param] = head_parameters(student, untied=True, keep_head=True)
    assert torch.equal(param, head)
    [param] = head_parameters(student, untied=True, keep_head=False)
    assert torch.equal(param, student.embed.weight)  # the random head replaced by the embeddings


@pytest.mark.parametrize("overrides, message", [
    ({"student.dim": 32}, r"superposition.init: teacher cannot cut .*student.projector_hidden >= 64"),
    ({"student.n_layers": 3}, r"student.n_layers 3 exceeds the teacher's num_hidden_layers \(2\)"),
    ({"student.dim": 24, "student.n_heads": 4, "student.projector_hidden": 64}, r"head size .* must divide"),
    ({"cache.layers": [1], "student.n_layers": 2}, r"student.n_layers 2 exceeds the 1 teacher blocks below"),
])
def test_a_student_that_cannot_be_cut_out_fails_before_any_work(tiny_teacher, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_run("superposition-distill", TINY, tiny_overrides(tiny_teacher, tmp_path, **{
            "superposition.init": "teacher", **overrides}), logging.getLogger("test"))
    assert not (tmp_path / "tokenize").exists()


def test_kl_in_reconstruction_needs_cached_logits(tiny_teacher, tmp_path):
    with pytest.raises(ConfigError, match=r"superposition.kl_weight > 0 needs cached teacher logits"):
        plan_run("superposition-distill", TINY, tiny_overrides(tiny_teacher, tmp_path, **{
            "superposition.kl_weight": 1.0, "cache.topk": 0}), logging.getLogger("test"))
