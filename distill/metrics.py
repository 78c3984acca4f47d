"""Held-out metrics: perplexity, KL(teacher || candidate), top-1 agreement and per-layer hidden cosine.

One pass over the evaluation batches: the teacher runs once per batch and every candidate (naive ternary
quantization, the trained students, ...) is compared against the same teacher outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from bitnet import hidden_cosine_loss, kl_to_teacher, next_token_cross_entropy


@dataclass
class Output:
    logits: torch.Tensor
    hidden: list[torch.Tensor] | None = None  # states comparable with the teacher's, layer by layer


Forward = Callable[[torch.Tensor, torch.Tensor], Output]


@dataclass
class _Sums:
    nll: float = 0.0
    predicted: int = 0  # tokens with a next-token target
    kl: float = 0.0
    agree: float = 0.0
    tokens: int = 0
    cosine: list[float] = field(default_factory=list)

    def add(self, out: Output, ids: torch.Tensor, mask: torch.Tensor, teacher: Output | None) -> None:
        predicted = int(mask[:, 1:].sum())
        tokens = int(mask.sum())
        self.nll += next_token_cross_entropy(out.logits, ids, mask).item() * predicted
        self.predicted += predicted
        if teacher is None:
            return
        logits = out.logits.to(teacher.logits.dtype)
        self.kl += kl_to_teacher(logits, teacher.logits, mask).item() * tokens
        same = (logits.argmax(-1) == teacher.logits.argmax(-1)).float()
        self.agree += float((same * mask).sum())
        self.tokens += tokens
        if out.hidden is not None and teacher.hidden is not None:
            cos = [1.0 - hidden_cosine_loss([s.to(t.dtype)], [t], mask).item() for s, t in zip(out.hidden, teacher.hidden)]
            self.cosine = [a + c * tokens for a, c in zip(self.cosine, cos)] if self.cosine else [c * tokens for c in cos]

    def result(self) -> dict:
        loss = self.nll / max(self.predicted, 1)
        result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": self.predicted}
        if self.tokens:
            result |= {"kl_to_teacher": self.kl / self.tokens, "top1_agreement": self.agree / self.tokens}
        if self.cosine:
            result["hidden_cosine"] = [c / self.tokens for c in self.cosine]
        return result


@torch.no_grad()
def compare_to_teacher(teacher: Forward, candidates: dict[str, Forward],
                       batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       progress: Callable[[], None] | None = None) -> dict[str, dict]:
    """``{"teacher": {...}, name: {...}}`` with loss, perplexity and, for candidates, KL, top-1, cosine."""
    sums = {"teacher": _Sums(), **{name: _Sums() for name in candidates}}
    for ids, mask in batches:
        reference = teacher(ids, mask)
        sums["teacher"].add(reference, ids, mask, None)
        for name, forward in candidates.items():
            sums[name].add(forward(ids, mask), ids, mask, reference)
        if progress is not None:
            progress()
    return {name: s.result() for name, s in sums.items()}
