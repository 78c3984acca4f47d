"""Distillation losses. Every loss is padding-masked and computed in fp32.

Masks follow transformers' convention: ``attention_mask`` is 1 for real tokens and 0 for padding, shape
``[batch, seq]``. Logits are ``[batch, seq, vocab]`` and hidden states ``[batch, seq, dim]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _check_pair(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{name}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)} "
            "(same batch, sequence length and width expected; project the student to the teacher's width first)"
        )
    if student.dtype != teacher.dtype:
        raise TypeError(
            f"{name}: student dtype {student.dtype} != teacher dtype {teacher.dtype}; "
            "cast one side explicitly (e.g. teacher.to(student.dtype)) so no precision is lost silently"
        )


def _token_mask(reference: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """fp32 mask ``[batch, seq]`` (all ones when no mask is given), validated against ``reference``."""
    if attention_mask is None:
        return torch.ones(reference.shape[:2], device=reference.device)
    if attention_mask.shape != reference.shape[:2]:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != [batch, seq] {tuple(reference.shape[:2])}")
    return attention_mask.to(device=reference.device, dtype=torch.float32)


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def next_token_cross_entropy(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal LM cross-entropy: position t predicts token t+1; padded targets are ignored."""
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    mask = _token_mask(logits, attention_mask)[:, 1:]
    per_token = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none"
    ).view_as(mask)
    return _masked_mean(per_token, mask)


def kl_to_teacher(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher || student) per token at temperature T, averaged over real tokens, scaled by T**2."""
    _check_pair("kl_to_teacher", student_logits, teacher_logits)
    mask = _token_mask(student_logits, attention_mask)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return _masked_mean(per_token, mask) * temperature**2


def sparse_topk_kl(
    student_logits: torch.Tensor,
    topk_values: torch.Tensor,
    topk_indices: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL against cached top-k teacher logits, the teacher renormalised over its k kept entries.

    ``sum_k p_k (log p_k - log q[idx_k])`` with ``p = softmax(topk_values / T)`` and ``q`` the student's
    full-vocabulary distribution: it is minimised when the student puts all its mass on the teacher's top-k
    in the teacher's proportions. Top-k caching biases the estimate (arXiv 2503.16870); prefer online KL when
    the teacher fits in memory.
    """
    if topk_values.shape != topk_indices.shape or topk_values.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"sparse_topk_kl: topk_values {tuple(topk_values.shape)} and topk_indices {tuple(topk_indices.shape)} "
            f"must both be [batch, seq, k] matching student logits {tuple(student_logits.shape)}"
        )
    if topk_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"sparse_topk_kl: topk_indices must be an integer tensor, got {topk_indices.dtype}")
    mask = _token_mask(student_logits, attention_mask)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, topk_indices.long())
    log_p = F.log_softmax(topk_values.float() / temperature, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return _masked_mean(per_token, mask) * temperature**2


def draw_tokens(logits: torch.Tensor, draws: int, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The targets of ``sampled_kl``: ``draws`` tokens drawn with replacement from ``softmax(logits)`` (rows
    ``[..., vocab]``), as ``(counts uint8, indices int32)`` of shape ``[..., draws]``, indices sorted. A token drawn
    n times has its count n on its first slot and 0 on the n - 1 slots after it, so the shape is fixed."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    drawn = torch.multinomial(flat.softmax(-1), draws, replacement=True, generator=generator).sort(-1).values
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    counts = (drawn.unsqueeze(-1) == drawn.unsqueeze(-2)).sum(-1) * first
    shape = (*logits.shape[:-1], draws)
    return counts.to(torch.uint8).view(shape), drawn.int().view(shape)


def sampled_kl(
    student_logits: torch.Tensor,
    counts: torch.Tensor,
    indices: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL against teacher logits cached as draws from the teacher's distribution (Random-Sampling KD,
    arXiv 2503.16870): ``counts[..., j]`` of the draws picked token ``indices[..., j]``.

    ``sum_j p_j (log p_j - log q[idx_j])`` with ``p = counts / draws``, the draws' empirical distribution. Over the
    draws, ``E[p]`` is the teacher's full distribution, so the gradient is an unbiased estimate of the full KL's
    (unlike the top-k's, which loses the tail); the value is the full KL plus the draws' entropy deficit, so compare
    it only between runs with the same draws. The draws are from the teacher at temperature 1, so this KL has no
    temperature. Slots with count 0 (repeats of a drawn token) contribute nothing.
    """
    if counts.shape != indices.shape or counts.shape[:2] != student_logits.shape[:2]:
        raise ValueError(f"sampled_kl: counts {tuple(counts.shape)} and indices {tuple(indices.shape)} must both be "
                         f"[batch, seq, k] matching student logits {tuple(student_logits.shape)}")
    mask = _token_mask(student_logits, attention_mask)
    log_q = F.log_softmax(student_logits.float(), dim=-1).gather(-1, indices.long())
    p = counts.float()
    p = p / p.sum(-1, keepdim=True).clamp(min=1.0)  # padded positions may hold no draws
    per_token = (torch.xlogy(p, p) - p * log_q).sum(-1)
    return _masked_mean(per_token, mask)


def hidden_cosine_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    magnitude_weight: float = 0.0,
) -> torch.Tensor:
    """Mean over layers of (1 - cosine) between per-token hidden states, padding-masked.

    With ``magnitude_weight > 0`` adds that weight times the squared difference of log-norms, so the
    student also matches the scale of the teacher's states (cosine alone is scale-blind).
    """
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(
            f"hidden_cosine_loss: got {len(student_hidden)} student and {len(teacher_hidden)} teacher layers; "
            "pass the same, non-empty list of layers on both sides"
        )
    losses = []
    for i, (s, t) in enumerate(zip(student_hidden, teacher_hidden)):
        _check_pair(f"hidden_cosine_loss layer {i}", s, t)
        mask = _token_mask(s, attention_mask)
        s32, t32 = s.float(), t.float()
        per_token = 1.0 - F.cosine_similarity(s32, t32, dim=-1, eps=1e-6)
        if magnitude_weight:
            log_ratio = torch.log(s32.norm(dim=-1) + 1e-6) - torch.log(t32.norm(dim=-1) + 1e-6)
            per_token = per_token + magnitude_weight * log_ratio.square()
        losses.append(_masked_mean(per_token, mask))
    return torch.stack(losses).mean()
