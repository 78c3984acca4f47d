"""The superposition student: masking, causality, rotary positions, generation, and learning to reconstruct."""

import pytest
import torch

from bitnet import BitLinear, Decompressor, SuperpositionStudent, hidden_cosine_loss
from bitnet.student import apply_rotary, rotary_tables


def small_student(**kwargs):
    torch.manual_seed(0)
    return SuperpositionStudent(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=32, **kwargs).eval()


def test_every_block_projection_is_bitlinear():
    student = small_student()
    projections = [m for block in student.blocks for m in block.modules() if isinstance(m, torch.nn.Linear)]
    assert projections and all(isinstance(m, BitLinear) for m in projections)
    assert type(student.lm_head) is torch.nn.Linear
    assert student.lm_head.weight is not student.embed.weight  # untied by default


def test_output_shapes():
    student = small_student()
    ids = torch.randint(0, 64, (3, 10))
    out = student(ids, output_hidden_states=True)
    assert out.logits.shape == (3, 10, 64) and out.last_hidden.shape == (3, 10, 32)
    assert len(out.hidden_states) == 3


def test_causal():
    student = small_student()
    ids = torch.randint(0, 64, (1, 10))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 64
    with torch.no_grad():
        a, b = student(ids).logits, student(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.equal(a[:, 7:], b[:, 7:])


def test_padding_does_not_leak_into_real_tokens():
    student = small_student()
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        padded = student(ids, attention_mask=mask).logits
        alone = student(ids[1:, :6]).logits
    torch.testing.assert_close(padded[1:, :6], alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(padded).all()


def test_rotary_embeddings_encode_relative_position():
    cos, sin = rotary_tables(8, 32, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(m, n):
        return (apply_rotary(q, cos[m], sin[m]) * apply_rotary(k, cos[n], sin[n])).sum()

    torch.testing.assert_close(score(5, 2), score(15, 12), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)


def test_model_sees_token_order():
    """The reference notebook's student had no positions; ours must tell "a b" from "b a"."""
    student = small_student()
    ids = torch.tensor([[5, 9, 5, 9]])
    swapped = torch.tensor([[9, 5, 9, 5]])
    with torch.no_grad():
        a = student(ids).last_hidden[0, -1]
        b = student(swapped).last_hidden[0, -1]
        c = student(torch.tensor([[9, 5, 5, 9]])).last_hidden[0, -1]
    assert not torch.allclose(a, c, atol=1e-4)  # same last token, same bag of tokens, different order
    assert not torch.allclose(a, b, atol=1e-4)


def test_generate():
    student = small_student()
    prompt = torch.randint(0, 64, (2, 3))
    greedy = student.generate(prompt, max_new_tokens=6, temperature=0)
    assert greedy.shape == (2, 9) and torch.equal(greedy[:, :3], prompt)
    assert torch.equal(greedy, student.generate(prompt, max_new_tokens=6, temperature=0))
    torch.manual_seed(0)
    sampled = student.generate(prompt, max_new_tokens=40, temperature=1.0, top_k=5)
    assert sampled.shape == (2, 43)  # longer than max_seq_len: the context is cropped


def test_tied_embeddings_option_and_untying():
    student = small_student(tie_embeddings=True)
    assert student.lm_head.weight is student.embed.weight
    student.untie_lm_head()
    assert student.lm_head.weight is not student.embed.weight
    torch.testing.assert_close(student.lm_head.weight, student.embed.weight)


def test_bad_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        SuperpositionStudent(vocab_size=64, dim=30, n_layers=1, n_heads=4)
    with pytest.raises(ValueError, match="exceeds the student's max_seq_len"):
        small_student()(torch.zeros(1, 33, dtype=torch.long))


def test_student_and_decompressor_learn_to_reconstruct_teacher_states():
    torch.manual_seed(0)
    student = SuperpositionStudent(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=16)
    projector = Decompressor(32, 48)
    ids = torch.randint(0, 64, (8, 16))
    target = torch.nn.Embedding(64, 48)(ids).detach().cumsum(1)  # a causal function of the tokens
    opt = torch.optim.AdamW([*student.parameters(), *projector.parameters()], lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = hidden_cosine_loss([projector(student(ids, compute_logits=False).last_hidden)], [target])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
