"""The lm_head stage: the superposition student's LM head retrained (the reference's phase 3).

By default a separate (untied) head is trained with every other weight frozen, so the representations the
student learned stay fixed; retraining a tied embedding, as the reference does (``head.untied: false``), also
changes the student's input embeddings. The new head starts from the embedding matrix, as a tied head would, unless
the superposition stage left a head worth keeping (cut out of the teacher's, or trained by ``superposition.kl_weight``).
Loss: cross-entropy, plus optional sparse KL to the teacher's cached top-k logits.
"""

from __future__ import annotations

import torch

from bitnet import SuperpositionStudent, next_token_cross_entropy
from storage.tensors import read_tensors

from ..config import ConfigError, PipelineConfig
from ..device import resolve_device
from ..distributed import Built, fit
from ..loop import ScheduledBatches, Trainable, TrainedManifest, resumable_step, save_trained
from ..optim import check_optimizer
from ..rows import Rows, cached_rows, to_device, token_rows
from ..stage import Context, Preflight, Stage
from ..teacher import TeacherFacts
from .superposition import (SuperpositionManifest, build_student, load_prefixed_state, load_trained_student,
                            prefixed_state)
from .teacher_cache import TeacherCacheManifest, cached_logits_kl
from .tokenize import TokenizeManifest


def head_parameters(student: SuperpositionStudent, untied: bool, keep_head: bool = False) -> list[torch.nn.Parameter]:
    """The parameters LM-head retraining trains; ``keep_head``: a separate head starts as it is rather than from the
    embedding matrix."""
    student.requires_grad_(False)
    if untied:
        if student.lm_head.weight is student.embed.weight:
            student.untie_lm_head()
        elif not keep_head:
            student.lm_head.weight.data.copy_(student.embed.weight.data)
    student.lm_head.weight.requires_grad_(True)  # tied: this is the embedding matrix itself
    return [student.lm_head.weight]


def lm_head_trainable(student: SuperpositionStudent, projector: torch.nn.Module, cfg: PipelineConfig, rows: Rows,
                      device: torch.device, eval_rows: Rows | None = None) -> Trainable:
    """The head's loss; its state is the whole student and decompressor (the head trained, the rest as trained
    before), which is what the stage saves."""
    head = cfg.head
    sp = cfg.superposition
    trained_by_kl = bool(sp.kl_weight) and sp.kl_head == "student"
    params = head_parameters(student, head.untied, keep_head=sp.init == "teacher" or trained_by_kl)
    batches = ScheduledBatches(rows, head.batch_size, cfg.seed + 1)
    student.to(device).eval()

    def logits_of(batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if head.untied:  # the body is frozen: no graph through it
            with torch.no_grad():
                hidden = student(ids, mask, compute_logits=False).last_hidden
            return student.lm_head(hidden)
        return student(ids, mask).logits

    def loss(micro_step: int):
        batch = to_device(batches(micro_step), device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = logits_of(batch)
        ce = next_token_cross_entropy(logits, ids, mask)
        metrics = {"ce": ce.item()}
        total = ce
        if head.topk_kl_weight:
            kl = cached_logits_kl(logits, batch, mask)
            total = total + head.topk_kl_weight * kl
            metrics["logit_kl"] = kl.item()
        return total, metrics

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        losses = [next_token_cross_entropy(logits_of(b), b["input_ids"], b["attention_mask"]).item()
                  for b in (to_device(x, device) for x in eval_rows.batches(head.batch_size, limit=4 * head.batch_size))]
        return {"loss": sum(losses) / len(losses)}

    return Trainable(
        parameters=params,
        loss=loss,
        state=lambda: prefixed_state(student=student, projector=projector),
        load_state=lambda state: load_prefixed_state(state, student=student, projector=projector),
        evaluate=evaluate if eval_rows is not None and eval_rows.count else None,
    )


class LmHeadManifest(TrainedManifest):
    trained: SuperpositionManifest  # the student whose head this retrained (its training history, its checkpoints)


class LmHead(Stage):
    name = "lm_head"
    Manifest = LmHeadManifest

    def check(self, pre: Preflight) -> None:
        if pre.config.head.topk_kl_weight and not pre.config.cache.topk:
            raise ConfigError("head.topk_kl_weight > 0 needs cached teacher logits: set cache.topk > 0 "
                              "(e.g. 64) or head.topk_kl_weight: 0")
        check_optimizer(pre.config.head_optim(), resolve_device(pre.config.teacher.device))

    def settings(self, cfg: PipelineConfig, teacher: TeacherFacts) -> dict:
        return {"head": cfg.head.fingerprinted()}

    def resumes(self, cfg: PipelineConfig, store, path: str) -> str | None:
        return resumable_step(store, path, cfg.head.steps)

    def build(self, ctx: Context, trained: SuperpositionManifest, tokens: TokenizeManifest,
              cache: TeacherCacheManifest) -> Built:
        """The trained student with its head to retrain, over token rows (or the cache's, for the top-k KL)."""
        cfg, store = ctx.config, ctx.store
        student, projector = load_trained_student(cfg, store, trained)
        if cfg.head.topk_kl_weight:  # the teacher's logits exist only for cached rows
            rows, eval_rows = (cached_rows(store, cache, s, cache.logit_arrays()) for s in ("train", "eval"))
        else:
            rows, eval_rows = token_rows(store, tokens, "train"), token_rows(store, tokens, "eval")
        trainable = lm_head_trainable(student, projector, cfg, rows, ctx.device, eval_rows)
        return Built(trainable, cfg.head_optim(), {}, "lm head")

    def run(self, ctx: Context, trained: SuperpositionManifest, tokens: TokenizeManifest,
            cache: TeacherCacheManifest) -> LmHeadManifest:
        history, state, _ = fit(ctx, self, trained=trained, tokens=tokens, cache=cache)
        return save_trained(ctx, LmHeadManifest, self.name, history, state, trained=trained)


def load_final_student(cfg: PipelineConfig, store, manifest: LmHeadManifest):
    """The student after LM-head retraining (its head untied when ``head.untied``), ready for evaluation."""
    student, projector = build_student(cfg, manifest.trained.vocab_size, manifest.trained.teacher_dim)
    if cfg.head.untied:
        student.untie_lm_head()
    load_prefixed_state(read_tensors(store, manifest.weights), student=student, projector=projector)
    return student.eval(), projector.eval()
