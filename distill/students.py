"""The trained student of each flow, as the evaluate and export stages see it: what to compare with the teacher,
how it generates, how lm-evaluation-harness scores it (and which requests it answers), how it is saved and loaded.
One adapter per flow, so those stages never ask which flow ran.

- ``SelfDistilled``: the teacher's own architecture, patched (``bitnet.patch_model``) with the trained dW; it
  exports in transformers' bitnet format, which stock ``AutoModelForCausalLM.from_pretrained`` loads.
- ``Superposed``: the small superposition student and its decompressor after LM-head retraining; it exports in
  this project's format (``bitnet.load_student``).

Both also write themselves as one GGUF file for llama.cpp (``save_gguf``; the superposition student as a llama
model, without its decompressor, which only training needs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from bitnet import BitLinear, DualModel, save_gguf, save_student, save_ternary_pretrained
from storage.tensors import read_tensors

from .metrics import Forward, Output
from .stage import Context
from .stages.lm_head import LmHeadManifest, load_final_student
from .stages.self_distill import SelfDistillManifest, dual_forward, load_dual
from .teacher import hidden_layers

Generate = Callable[[torch.Tensor, int], torch.Tensor]  # (prompt ids, new tokens) -> ids


def hf_generate(dual: DualModel, mode, tokenizer) -> Generate:
    """Greedy generation of the dual-mode model in ``mode`` (a context factory: teacher, student, ptq)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(ids: torch.Tensor, n: int) -> torch.Tensor:
        with mode():
            return dual.model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=pad)
    return generate


@contextmanager
def hf_harness(dual: DualModel, mode, tokenizer, batch_size: int) -> Iterator:
    """The dual-mode model in ``mode`` as the harness's own HF wrapper (lm_eval's ``HFLM``), while it is open."""
    from .harness_lm import hf_lm

    with mode():
        yield hf_lm(dual.model, tokenizer, batch_size)


class SelfDistilled:
    flow = "self-distill"
    harness_requests = None  # a transformers model: every kind of harness task
    library_name = "transformers"  # stock from_pretrained loads it
    base_model_relation = "quantized"  # the teacher's own architecture, ternary
    loading = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
               "model = AutoModelForCausalLM.from_pretrained(path)  # needs accelerate\n"
               "tokenizer = AutoTokenizer.from_pretrained(path)\n```")

    def __init__(self, ctx: Context, manifest: SelfDistillManifest, dual: DualModel | None = None):
        self.manifest = manifest
        self.dual = dual if dual is not None else load_dual(ctx.config, ctx.teacher, ctx.device)
        self.dual.load_delta_state_dict(read_tensors(ctx.store, manifest.weights))
        # compared with the teacher layer by layer: the hidden states the loss may match
        self.compared_layers = hidden_layers(ctx.config.self_distill.hidden_layers,
                                             self.dual.model.config.num_hidden_layers)
        self.curves = {"self_distill": ctx.store.read_json(manifest.history)}
        self.checkpoints = {"checkpoints": manifest.checkpoints}

    def candidates(self) -> dict[str, Forward]:
        return {"student": dual_forward(self.dual, self.dual.student, self.compared_layers)}

    def generator(self, tokenizer) -> Generate:
        return hf_generate(self.dual, self.dual.student, tokenizer)

    def harness_model(self, tokenizer, batch_size: int):
        """A context: the student as an lm-evaluation-harness ``LM`` while it is open."""
        return hf_harness(self.dual, self.dual.student, tokenizer, batch_size)

    def ternary_shapes(self) -> list[tuple[int, int]]:
        return [(layer.out_features, layer.in_features) for layer in self.dual.layers.values()]

    def save(self, directory, tokenizer) -> dict:
        return save_ternary_pretrained(self.dual, directory, tokenizer)

    def save_gguf(self, path, tokenizer, qtype: str, embeddings: str, name: str) -> dict:
        return save_gguf(self.dual, path, tokenizer, qtype, embeddings, name=name)


class Superposed:
    flow = "superposition-distill"
    harness_requests = ("loglikelihood",)  # distill.harness_lm.ForwardLM: multiple-choice tasks
    library_name = None  # bitnet.load_student, not transformers
    base_model_relation = None  # another architecture than the teacher's
    loading = ("```python\nfrom bitnet import load_student\nfrom transformers import AutoTokenizer\n"
               "student, projector = load_student(path)\ntokenizer = AutoTokenizer.from_pretrained(path)\n```")

    def __init__(self, ctx: Context, manifest: LmHeadManifest, dual: DualModel | None = None):
        self.manifest, self.dual = manifest, dual
        self.small, self.projector = load_final_student(ctx.config, ctx.store, manifest)
        self.small.to(ctx.device)
        self.projector.to(ctx.device)
        # compared with the teacher at the layer it was trained to reconstruct, through its decompressor
        self.compared_layers = [int(manifest.trained.target.removeprefix("hidden/layer_"))]
        self.curves = {"superposition": ctx.store.read_json(manifest.trained.history),
                       "lm_head": ctx.store.read_json(manifest.history)}
        self.checkpoints = {"checkpoints": manifest.checkpoints, "student checkpoints": manifest.trained.checkpoints}

    def candidates(self) -> dict[str, Forward]:
        small, projector = self.small, self.projector

        def student(ids, mask) -> Output:
            out = small(ids, mask)
            return Output(out.logits, [projector(out.last_hidden)])

        forwards = {"student": student}
        if self.dual is not None:  # its states decoded by the teacher's own head: how much the head retraining adds
            head = self.dual.model.get_output_embeddings()
            forwards["student_via_teacher_head"] = lambda ids, mask: Output(
                head(projector(small(ids, mask, compute_logits=False).last_hidden).to(head.weight.dtype)))
        return forwards

    def generator(self, tokenizer) -> Generate:
        return lambda ids, n: self.small.generate(ids, n, temperature=0)

    @contextmanager
    def harness_model(self, tokenizer, batch_size: int) -> Iterator:
        """A context: the student as an lm-evaluation-harness ``LM`` (its own forward; log-likelihoods only)."""
        from .harness_lm import ForwardLM

        yield ForwardLM(lambda ids: self.small(ids).logits, tokenizer, self.small.config.max_seq_len, batch_size,
                        next(self.small.parameters()).device, what="the superposition student")

    def ternary_shapes(self) -> list[tuple[int, int]]:
        return [tuple(m.weight.shape) for m in self.small.modules() if isinstance(m, BitLinear)]

    def save(self, directory, tokenizer) -> dict:
        sizes = save_student(self.small, self.projector, directory)
        tokenizer.save_pretrained(directory)
        return sizes

    def save_gguf(self, path, tokenizer, qtype: str, embeddings: str, name: str) -> dict:
        return save_gguf(self.small, path, tokenizer, qtype, embeddings, name=name)


STUDENTS = {adapter.flow: adapter for adapter in (SelfDistilled, Superposed)}


def open_student(ctx: Context, manifest: SelfDistillManifest | LmHeadManifest,
                 dual: DualModel | None = None) -> SelfDistilled | Superposed:
    """The adapter of the stage that made ``manifest``; ``dual`` is the teacher already loaded, if it is."""
    adapter = {SelfDistillManifest: SelfDistilled, LmHeadManifest: Superposed}[type(manifest)]
    return adapter(ctx, manifest, dual)
