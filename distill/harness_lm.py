"""The evaluate stage's models as lm-evaluation-harness ``LM``s. Imported only when ``eval.lm_eval.tasks`` is set:
it imports lm_eval (the ``eval`` extra).

- ``hf_lm``: a transformers model (the teacher, or the dual-mode model in any of its modes) through the harness's
  own ``HFLM``, the wrapper ``lm_eval --model hf`` uses: the same tokenization, batching and scoring.
- ``ForwardLM``: any causal LM given as a forward function (token ids -> logits), for students that are not
  transformers models (the superposition student). It answers log-likelihood requests, which multiple-choice tasks
  make, the way ``HFLM`` does (context truncated from the left to the model's window, right padding); rolling
  log-likelihoods (perplexity tasks) and generation are not implemented and say so.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.huggingface import HFLM


def hf_lm(model, tokenizer, batch_size: int) -> HFLM:
    """The harness's HF wrapper around a loaded model (on its device, in its dtype)."""
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


class ForwardLM(TemplateLM):
    """A causal LM scored by its own forward pass, ``forward(ids [batch, seq]) -> logits [batch, seq, vocab]``."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], tokenizer, max_length: int, batch_size: int,
                 device: torch.device, what: str = "this model"):
        super().__init__()
        self.forward, self.tokenizer, self.max_length = forward, tokenizer, max_length
        self.batch_size, self._device, self.what = batch_size, device, what  # LM.device reads _device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # the token an empty context is scored after, as HFLM chooses it
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # the tokenizer's own default for special tokens unless told, as HFLM does without add_bos_token
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **special)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # longest first, as HFLM orders them: batches of similar length pad little
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        longest = max((len(r[2]) for r in requests), default=0)
        if longest > self.max_length:  # HFLM asserts the same: a continuation is never truncated
            raise ValueError(f"a continuation of {longest} tokens does not fit {self.what}'s window of "
                             f"{self.max_length} tokens: train it with a longer data.seq_len, or choose tasks with "
                             "shorter answers")
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            # the last max_length tokens of context + continuation, less the last one (nothing predicts after it)
            inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in batch]
            width = max(len(x) for x in inputs)
            ids = torch.tensor([x + [pad] * (width - len(x)) for x in inputs], device=self.device)
            logprobs = F.log_softmax(self.forward(ids).float(), dim=-1)  # right padding: a causal model ignores it
            for row, i, x in zip(logprobs, batch, inputs):
                continuation = torch.tensor(requests[i][2], device=self.device)
                scored = row[len(x) - len(continuation):len(x)]
                greedy = bool((scored.argmax(-1) == continuation).all())
                results[i] = (float(scored.gather(-1, continuation[:, None]).sum()), greedy)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(f"{self.what} answers loglikelihood requests only (multiple-choice tasks); "
                                  "loglikelihood_rolling (perplexity tasks) is not implemented: choose "
                                  "multiple-choice tasks in eval.lm_eval.tasks")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(f"{self.what} answers loglikelihood requests only (multiple-choice tasks); "
                                  "generate_until (generative tasks) is not implemented: choose multiple-choice "
                                  "tasks in eval.lm_eval.tasks")
