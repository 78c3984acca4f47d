"""Distillation losses: values against direct computations, masking, and clear errors."""

import pytest
import torch
import torch.nn.functional as F

from bitnet import hidden_cosine_loss, kl_to_teacher, next_token_cross_entropy, sampled_kl, sparse_topk_kl
from bitnet.losses import draw_tokens

from .tiny_models import tiny_causal_lm, token_batch


def padded_batch():
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return mask


def test_cross_entropy_matches_transformers_loss(tmp_path):
    model = tiny_causal_lm("llama", tmp_path)
    ids = token_batch()
    out = model(ids, labels=ids)
    torch.testing.assert_close(next_token_cross_entropy(out.logits, ids), out.loss, rtol=1e-5, atol=1e-6)


def test_cross_entropy_ignores_padding():
    torch.manual_seed(0)
    logits, ids, mask = torch.randn(2, 6, 10), torch.randint(0, 10, (2, 6)), padded_batch()
    changed_logits, changed_ids = logits.clone(), ids.clone()
    changed_logits[1, 4:] += 5.0  # positions predicting padding, and padded predictions
    changed_ids[1, 4:] = 0
    base = next_token_cross_entropy(logits, ids, mask)
    torch.testing.assert_close(next_token_cross_entropy(changed_logits, changed_ids, mask), base)
    manual = torch.cat([F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none"),
                        F.cross_entropy(logits[1, :3], ids[1, 1:4], reduction="none")]).mean()
    torch.testing.assert_close(base, manual)


def test_kl_is_zero_for_identical_logits_and_matches_definition():
    torch.manual_seed(1)
    s, t = torch.randn(2, 6, 10), torch.randn(2, 6, 10)
    assert kl_to_teacher(t, t).item() == pytest.approx(0.0, abs=1e-6)
    p = F.softmax(t / 2.0, -1)
    manual = (p * (p.log() - F.log_softmax(s / 2.0, -1))).sum(-1).mean() * 4.0
    torch.testing.assert_close(kl_to_teacher(s, t, temperature=2.0), manual)


def test_kl_ignores_padding():
    torch.manual_seed(2)
    s, t, mask = torch.randn(2, 6, 10), torch.randn(2, 6, 10), padded_batch()
    s2 = s.clone()
    s2[1, 4:] = 100.0
    torch.testing.assert_close(kl_to_teacher(s2, t, mask), kl_to_teacher(s, t, mask))


def test_sparse_kl_with_full_vocab_equals_kl():
    torch.manual_seed(3)
    s, t = torch.randn(2, 6, 10), torch.randn(2, 6, 10)
    values, indices = t.topk(10, dim=-1)
    torch.testing.assert_close(sparse_topk_kl(s, values, indices, temperature=1.5), kl_to_teacher(s, t, temperature=1.5))


def test_sparse_kl_renormalises_over_kept_entries():
    torch.manual_seed(4)
    s, t = torch.randn(1, 3, 10), torch.randn(1, 3, 10)
    values, indices = t.topk(3, dim=-1)
    values = values.half()  # as the teacher cache stores them
    p = F.softmax(values.float(), -1)
    log_q = F.log_softmax(s, -1).gather(-1, indices)
    torch.testing.assert_close(sparse_topk_kl(s, values, indices.int()), (p * (p.log() - log_q)).sum(-1).mean())


def test_drawn_tokens_are_distinct_tokens_with_their_counts():
    logits = torch.randn(2, 5, 40) * 3
    counts, indices = draw_tokens(logits, 24, torch.Generator().manual_seed(0))
    assert counts.shape == indices.shape == (2, 5, 24) and counts.dtype == torch.uint8 and indices.dtype == torch.int32
    assert (counts.sum(-1) == 24).all()
    for c, i in zip(counts.flatten(0, 1), indices.flatten(0, 1)):
        drawn = i[c > 0]
        assert drawn.unique().numel() == drawn.numel()  # each distinct token once, with its count
        assert set(i.tolist()) == set(drawn.tolist())  # the other slots repeat a drawn token, with count 0
    again = draw_tokens(logits, 24, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], counts) and torch.equal(again[1], indices)  # the generator decides the draws


def test_sampled_kl_is_an_unbiased_estimate_of_the_full_kl_gradient_where_top_k_is_biased():
    """Averaged over draws, the sampled KL's gradient is the full KL's; the top-k's with the same k is not."""
    torch.manual_seed(5)
    teacher = torch.randn(2, 3, 50) * 1.5
    student = torch.randn(2, 3, 50, requires_grad=True)
    [full] = torch.autograd.grad(kl_to_teacher(student, teacher), student)
    generator, mean, n = torch.Generator().manual_seed(6), torch.zeros_like(student), 1000
    for _ in range(n):
        [grad] = torch.autograd.grad(sampled_kl(student, *draw_tokens(teacher, 8, generator)), student)
        mean += grad / n
    [topk] = torch.autograd.grad(sparse_topk_kl(student, *teacher.topk(8, dim=-1)), student)
    scale = full.abs().max()
    assert (mean - full).abs().max() < 0.05 * scale
    assert (topk - full).abs().max() > 0.3 * scale


def test_sampled_kl_value_padding_and_errors():
    student = torch.randn(2, 6, 10)
    counts = torch.zeros(2, 6, 3, dtype=torch.uint8)
    counts[..., 0] = 2
    counts[..., 1] = 1
    indices = torch.tensor([4, 7, 7], dtype=torch.int32).expand(2, 6, 3)
    p = torch.tensor([2 / 3, 1 / 3])
    log_q = F.log_softmax(student, -1)[..., [4, 7]]
    want = (p * p.log() - p * log_q).sum(-1)
    mask = padded_batch()
    torch.testing.assert_close(sampled_kl(student, counts, indices, mask), want[mask.bool()].mean())
    with pytest.raises(ValueError, match="counts .* and indices .* must both be"):
        sampled_kl(student, counts[..., :2], indices)


def test_hidden_cosine_loss_properties():
    torch.manual_seed(5)
    t = [torch.randn(2, 6, 8) for _ in range(3)]
    assert hidden_cosine_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    scaled = [3.0 * h for h in t]
    assert hidden_cosine_loss(scaled, t).item() == pytest.approx(0.0, abs=1e-6)  # scale-blind...
    magnitude = hidden_cosine_loss(scaled, t, magnitude_weight=1.0).item()
    assert magnitude == pytest.approx(torch.log(torch.tensor(3.0)).item() ** 2, rel=1e-4)  # ...unless asked
    opposite = hidden_cosine_loss([-h for h in t], t).item()
    assert opposite == pytest.approx(2.0, abs=1e-5)


def test_hidden_cosine_loss_ignores_padding():
    torch.manual_seed(6)
    s, t, mask = torch.randn(2, 6, 8), torch.randn(2, 6, 8), padded_batch()
    s2 = s.clone()
    s2[1, 4:] = -t[1, 4:]
    torch.testing.assert_close(hidden_cosine_loss([s2], [t], mask), hidden_cosine_loss([s], [t], mask))


def test_loss_input_errors_are_clear():
    a = torch.randn(2, 6, 8)
    with pytest.raises(ValueError, match=r"student shape \(2, 6, 8\) != teacher shape \(2, 6, 16\)"):
        hidden_cosine_loss([a], [torch.randn(2, 6, 16)])
    with pytest.raises(TypeError, match="cast one side"):
        kl_to_teacher(a, a.half())
    with pytest.raises(ValueError, match="same, non-empty list of layers"):
        hidden_cosine_loss([a, a], [a])
    with pytest.raises(ValueError, match="attention_mask shape"):
        kl_to_teacher(a, a, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"\[batch, seq, k\]"):
        sparse_topk_kl(a, torch.randn(2, 6, 3), torch.zeros(2, 6, 4, dtype=torch.long))
