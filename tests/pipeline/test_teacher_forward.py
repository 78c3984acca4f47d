"""The cache stage's teacher forward: the block-wise top-k reproduces the model's own, or is not used."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from distill.stages.teacher_cache import TeacherForward
from tests.bitnet.tiny_models import _COMMON, CONFIGS, VOCAB, token_batch, tiny_causal_lm

# Models whose logits are not their output embedding of the last hidden state.
POSTPROCESSED = {
    "gemma2": lambda: tf.Gemma2Config(num_key_value_heads=2, head_dim=8, final_logit_softcapping=30.0, **_COMMON),
    "cohere": lambda: tf.CohereConfig(num_key_value_heads=2, logit_scale=0.0625, **_COMMON),
}


def own_outputs(model, ids, mask, layers, topk):
    """What the model's own forward gives: the reference."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    result = {f"hidden/layer_{i}": out.hidden_states[i] for i in layers}
    if topk:
        values, indices = out.logits.topk(topk, dim=-1)
        result |= {"topk_values": values.half(), "topk_indices": indices.int()}
    return result


def batches(n: int = 3):
    for seed in range(n):
        ids = token_batch(batch=3, seq=10, seed=seed)
        mask = torch.ones_like(ids)
        mask[seed % 3, 6:] = 0  # a padded row
        yield ids, mask


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_block_wise_topk_equals_the_models_own(family, tmp_path):
    model = tiny_causal_lm(family, tmp_path)
    forward = TeacherForward(model, layers=[1, 2], topk=8)
    forward.block_rows = 7  # 30 rows per batch: blocks of 7, 7, 7, 7 and 2
    for ids, mask in batches():
        assert_same(forward(ids, mask), own_outputs(model, ids, mask, [1, 2], 8))
    assert forward.fused is True


def test_without_topk_only_hidden_states(tmp_path):
    model = tiny_causal_lm("llama", tmp_path)
    forward = TeacherForward(model, layers=[0, 2])
    for ids, mask in batches():
        assert_same(forward(ids, mask), own_outputs(model, ids, mask, [0, 2], 0))
    assert forward.fused is True


@pytest.mark.parametrize("family", sorted(POSTPROCESSED))
def test_postprocessed_logits_keep_the_full_logits(family, tmp_path):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(POSTPROCESSED[family]()).eval()
    messages = []
    forward = TeacherForward(model, layers=[2], topk=8, log=messages.append)
    for ids, mask in batches():
        assert_same(forward(ids, mask), own_outputs(model, ids, mask, [2], 8))
    assert forward.fused is False
    assert len(messages) == 1 and "top-k logits differ" in messages[0] and "full logits" in messages[0]


def test_block_rows_follow_the_vocabulary(tmp_path):
    model = tiny_causal_lm("llama", tmp_path)
    assert TeacherForward(model, [2], topk=4).block_rows == (1 << 21) // VOCAB
    # an output embedding larger than the caches (40,000 x 256 float32: 41 MB) gets at least 1024 rows per block,
    # since each block streams all of it
    big = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{**_COMMON, "vocab_size": 40_000, "hidden_size": 256}))
    assert TeacherForward(big, [2], topk=4).block_rows == 1024


def test_a_failing_block_wise_path_keeps_the_full_logits(tmp_path, monkeypatch):
    model = tiny_causal_lm("llama", tmp_path)
    # no base model to call on its own (``base_model`` is then the model, whose output has no last_hidden_state)
    monkeypatch.setattr(model, "base_model_prefix", "no_such_module")
    messages = []
    forward = TeacherForward(model, layers=[2], topk=8, log=messages.append)
    for ids, mask in batches(2):
        assert_same(forward(ids, mask), own_outputs(model, ids, mask, [2], 8))
    assert forward.fused is False
    assert len(messages) == 1 and "AttributeError" in messages[0] and "full logits" in messages[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_block_wise_topk_is_used(tmp_path):
    """On a GPU in bf16 the blocks may round differently from the whole matmul; the check must still pass."""
    model = tiny_causal_lm("llama", tmp_path, dtype=torch.bfloat16).cuda()
    forward = TeacherForward(model, layers=[2], topk=8)
    assert forward.block_rows == (1 << 27) // VOCAB
    forward.block_rows = 7
    for ids, mask in batches():
        got = forward(ids.cuda(), mask.cuda())
        want = own_outputs(model, ids.cuda(), mask.cuda(), [2], 8)
        assert torch.equal(got["hidden/layer_2"], want["hidden/layer_2"])
        torch.testing.assert_close(got["topk_values"], want["topk_values"], rtol=0.02, atol=0.02)
        # the tokens chosen are a top-k of the model's own logits, up to bf16 rounding: their logits are the values
        # stored, and none lies below the k-th largest (ties may be broken either way)
        logits = model(input_ids=ids.cuda(), attention_mask=mask.cuda(), use_cache=False).logits.float()
        chosen = logits.gather(-1, got["topk_indices"].long())
        torch.testing.assert_close(chosen, got["topk_values"].float(), rtol=0.02, atol=0.02)
        kth = want["topk_values"][..., -1:].float()
        assert (chosen >= kth - 0.02 - 0.02 * kth.abs()).all()
    assert forward.fused is True


def test_sampled_logits_are_draws_from_the_teachers_distribution(tmp_path):
    """cache.logits: sampled: k draws per position from the teacher's own distribution, the same for the same seed
    (a resumed chunk draws what it drew), counted per distinct token."""
    model = tiny_causal_lm("llama", tmp_path)
    with torch.no_grad():  # a peaked distribution, far from uniform draws
        model.get_output_embeddings().weight.mul_(40)
    forward = TeacherForward(model, layers=[2], topk=16, logits="sampled")
    forward.block_rows = 7
    ids, mask = next(batches(1))
    out = forward(ids, mask, seed=3)
    assert set(out) == {"hidden/layer_2", "sampled_counts", "sampled_indices"}
    assert out["sampled_counts"].dtype == torch.uint8 and out["sampled_indices"].dtype == torch.int32
    assert (out["sampled_counts"].sum(-1) == 16).all()
    assert_same(forward(ids, mask, seed=3), out)
    assert not torch.equal(forward(ids, mask, seed=4)["sampled_indices"], out["sampled_indices"])
    # over many seeds, the frequency of each token is the teacher's probability of it
    with torch.no_grad():
        probs = model(input_ids=ids, attention_mask=mask).logits.softmax(-1)
    assert probs.amax(-1).min() > 0.2
    frequency = torch.zeros_like(probs)
    for seed in range(200):
        drawn = forward(ids, mask, seed=seed)
        frequency.scatter_add_(-1, drawn["sampled_indices"].long(), drawn["sampled_counts"].float() / (16 * 200))
    assert (frequency - probs).abs().max() < 0.03
