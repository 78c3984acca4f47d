"""The superposition student cut out of its teacher (bitnet/student_init.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitnet import BitLinear, Decompressor, StudentConfig, SuperpositionStudent
from bitnet.student_init import (derivation_problems, evenly_spaced, init_from_teacher, matched_layers,
                                 teacher_statistics)

from .tiny_models import VOCAB, tiny_causal_lm, token_batch


def _student(teacher, dim, n_heads, mlp_hidden, n_layers=None, projector_hidden=None):
    c = teacher.config
    student = SuperpositionStudent(VOCAB, dim, n_layers or c.num_hidden_layers, n_heads, mlp_hidden=mlp_hidden,
                                   max_seq_len=64, norm_eps=c.rms_norm_eps, rope_theta=c.rope_parameters["rope_theta"],
                                   projector_hidden=projector_hidden)
    return student, Decompressor(dim, c.hidden_size, projector_hidden)


def _stats(teacher, ids, mask):
    return teacher_statistics(teacher, [(ids, mask)])


def _unquantized(student):
    for m in student.modules():
        if isinstance(m, BitLinear):
            m.quant_lambda = 0.0  # the latent weights as they are: the surgery, without ternary rounding
    return student


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_a_full_width_student_is_its_teacher(family, tmp_path):
    """As wide and deep as the teacher, the cut is only a rotation of the residual stream (and grouped keys and
    values repeated): the unquantized student computes the teacher's logits, and the decompressor maps its last
    states onto the teacher's exactly (cosine 1)."""
    teacher = tiny_causal_lm(family, tmp_path)
    if family == "qwen2":  # the student has no biases to take Qwen2's q/k/v biases
        for block in teacher.model.layers:
            for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                proj.bias.data.zero_()
    c = teacher.config
    ids = token_batch(4, 16)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    student, projector = _student(teacher, c.hidden_size, c.num_attention_heads, c.intermediate_size,
                                  projector_hidden=2 * c.hidden_size)
    init_from_teacher(student, projector, teacher, _stats(teacher, ids, mask), -1)
    _unquantized(student)
    with torch.no_grad():
        want = teacher(ids, attention_mask=mask, output_hidden_states=True)
        got = student(ids, mask)
        keep = mask.bool()
        torch.testing.assert_close(got.logits[keep], want.logits[keep], atol=2e-4, rtol=1e-3)
        cosine = F.cosine_similarity(projector(got.last_hidden), want.hidden_states[-1], dim=-1)[keep]
    assert cosine.min() > 1 - 1e-5


def test_an_inner_target_keeps_the_blocks_below_it(tmp_path):
    """Reconstructing an inner layer, the student takes the blocks below it, and the decompressor maps onto the
    (unnormed) residual stream there."""
    teacher = tiny_causal_lm("llama", tmp_path)
    c = teacher.config
    ids = token_batch(2, 16)
    mask = torch.ones_like(ids)
    student, projector = _student(teacher, c.hidden_size, c.num_attention_heads, c.intermediate_size, n_layers=1,
                                  projector_hidden=2 * c.hidden_size)
    chosen = init_from_teacher(student, projector, teacher, _stats(teacher, ids, mask), 1)
    assert chosen["teacher_blocks"] == [0]
    _unquantized(student)
    with torch.no_grad():
        want = teacher(ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
        got = projector(student(ids, mask, compute_logits=False).last_hidden)
    assert F.cosine_similarity(got, want, dim=-1).min() > 1 - 1e-5


def test_a_narrower_student_starts_far_closer_than_a_random_one(tmp_path):
    """Half the width, heads half as wide, fewer MLP channels and layers: still a much better start than random
    weights, quantized (the student as the superposition stage trains it)."""
    teacher = tiny_causal_lm("llama", tmp_path)
    c = teacher.config  # hidden 32, 4 heads of 8, intermediate 64, 2 layers
    ids = token_batch(8, 16)
    mask = torch.ones_like(ids)
    stats = _stats(teacher, ids, mask)
    with torch.no_grad():
        want = teacher(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]

    def loss(student, projector):
        with torch.no_grad():
            got = projector(student(ids, mask, compute_logits=False).last_hidden)
        return float(1 - F.cosine_similarity(got, want, dim=-1).mean())

    torch.manual_seed(0)
    random_student = _student(teacher, 16, 4, 32, n_layers=1)
    torch.manual_seed(0)
    student, projector = _student(teacher, 16, 4, 32, n_layers=1)
    chosen = init_from_teacher(student, projector, teacher, stats, -1)
    assert chosen["teacher_blocks"] == [1]
    assert 0 < chosen["residual_energy_kept"] < 1
    assert len(chosen["heads"][0]) == 4
    assert loss(student, projector) < 0.5 * loss(*random_student)


def test_evenly_spaced_layers():
    assert evenly_spaced(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced(3, 12) == [0, 6, 11]  # round(5.5) is 6 (round half to even)
    assert evenly_spaced(1, 12) == [11]


def test_inner_layers_match_the_student_state_whose_teacher_counterpart_is_nearest():
    # a 4-block student of a 12-block teacher stands for blocks [0, 4, 7, 11]: outputs 1, 5, 8, 12
    assert matched_layers([0, 1, 4, 5, 6, 7, 10], 12, 4) == {0: 0, 1: 1, 4: 2, 5: 2, 6: 2, 7: 3, 10: 3}
    assert matched_layers([1, 2, 3], 4, 4) == {1: 1, 2: 2, 3: 3}


def test_an_inner_layer_decompressor_starts_as_the_inverse_projection(tmp_path):
    """At full width, an inner layer's decompressor maps the student's state onto the teacher's residual there."""
    teacher = tiny_causal_lm("llama", tmp_path)
    c = teacher.config
    ids = token_batch(2, 16)
    mask = torch.ones_like(ids)
    student, projector = _student(teacher, c.hidden_size, c.num_attention_heads, c.intermediate_size,
                                  projector_hidden=2 * c.hidden_size)
    inner = Decompressor(c.hidden_size, c.hidden_size, 2 * c.hidden_size)
    init_from_teacher(student, projector, teacher, _stats(teacher, ids, mask), -1, {1: inner})
    _unquantized(student)
    with torch.no_grad():
        want = teacher(ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
        got = inner(student(ids, mask, output_hidden_states=True).hidden_states[1])
    assert F.cosine_similarity(got, want, dim=-1).min() > 1 - 1e-5


def test_shapes_that_cannot_be_cut_name_the_fields(tmp_path):
    teacher = tiny_causal_lm("llama", tmp_path)
    c = teacher.config  # hidden 32, 4 heads of 8, intermediate 64, 2 layers, rope theta 10000
    problems = derivation_problems(c, StudentConfig(VOCAB, dim=64, n_layers=3, n_heads=8, mlp_hidden=128,
                                                    rope_theta=500000.0), projector_hidden=64)
    text = " | ".join(problems)
    for field in ("student.dim 64", "student.n_layers 3", "student.n_heads 8", "student.mlp_hidden 128",
                  "student.rope_theta: 10000", "student.projector_hidden >= 128"):
        assert field in text
    phi3 = tiny_causal_lm("phi3", tmp_path).config  # fused qkv and gate_up projections
    assert "a phi3 teacher: the student is cut out of llama, mistral, qwen2 teachers" in \
        derivation_problems(phi3, StudentConfig(VOCAB, dim=16, n_layers=1, n_heads=4, mlp_hidden=32))[0]
    assert "head size" in derivation_problems(c, StudentConfig(VOCAB, dim=24, n_layers=1, n_heads=4, mlp_hidden=32))[0]
    assert derivation_problems(c, StudentConfig(VOCAB, dim=16, n_layers=2, n_heads=4, mlp_hidden=64)) == []
    student, projector = _student(teacher, 16, 4, 32, n_layers=2)
    stats = _stats(teacher, token_batch(2, 8), torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="student.n_layers 2 exceeds the 1 teacher blocks below"):
        init_from_teacher(student, projector, teacher, stats, 1)
