"""The superposition stage: a small BitNet student plus a decompressor learn to reconstruct the teacher's cached
hidden states (cosine loss, padding-masked), reading batches from the teacher cache."""

from __future__ import annotations

import dataclasses

import torch

from bitnet import Decompressor, SuperpositionStudent, hidden_cosine_loss
from storage.tensors import read_tensors

from ..config import ConfigError, PipelineConfig
from ..device import resolve_device
from ..distributed import Built, fit
from ..loop import ScheduledBatches, Trainable, TrainedManifest, resumable_step, save_trained
from ..optim import check_optimizer
from ..rows import Rows, cached_rows, to_device
from ..stage import Context, Preflight, Stage
from ..teacher import TeacherFacts
from .teacher_cache import TeacherCacheManifest


def build_student(cfg: PipelineConfig, vocab_size: int, teacher_dim: int) -> tuple[SuperpositionStudent, Decompressor]:
    """The student (``student.*`` with the teacher's vocabulary and ``data.seq_len``), initialised from the run's
    seed, and its decompressor to the teacher's width."""
    shape = cfg.student_shape(vocab_size)
    torch.manual_seed(cfg.seed)
    student = SuperpositionStudent(**dataclasses.asdict(shape))
    return student, Decompressor(shape.dim, teacher_dim, shape.projector_hidden)


def prefixed_state(**modules: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy (tied weights must not share memory in safetensors) of the modules' states, names prefixed."""
    return {f"{name}.{k}": v.detach().clone() for name, m in modules.items() for k, v in m.state_dict().items()}


def load_prefixed_state(state: dict[str, torch.Tensor], **modules: torch.nn.Module) -> None:
    for name, module in modules.items():
        module.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})


def reconstruction_loss(student, projector, batch: dict, target_key: str) -> torch.Tensor:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    predicted = projector(student(ids, mask, compute_logits=False).last_hidden)
    return hidden_cosine_loss([predicted], [batch[target_key].to(predicted.dtype)], mask)


def superposition_trainable(student: SuperpositionStudent, projector: Decompressor, cfg: PipelineConfig,
                            rows: Rows, target_key: str, device: torch.device, eval_rows: Rows | None = None) -> Trainable:
    batches = ScheduledBatches(rows, cfg.train.batch_size, cfg.seed)
    student.to(device).train()
    projector.to(device).train()

    def loss(micro_step: int):
        batch = to_device(batches(micro_step), device)
        return reconstruction_loss(student, projector, batch, target_key), {}

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        student.eval(), projector.eval()
        losses = [reconstruction_loss(student, projector, to_device(b, device), target_key).item()
                  for b in eval_rows.batches(cfg.train.batch_size, limit=4 * cfg.train.batch_size)]
        student.train(), projector.train()
        return {"cosine_loss": sum(losses) / len(losses)}

    return Trainable(
        parameters=[*student.parameters(), *projector.parameters()],
        loss=loss,
        state=lambda: prefixed_state(student=student, projector=projector),
        load_state=lambda state: load_prefixed_state(state, student=student, projector=projector),
        evaluate=evaluate if eval_rows is not None and eval_rows.count else None,
    )


class SuperpositionManifest(TrainedManifest):
    target: str  # the cached array the student reconstructs: hidden/layer_<i>
    vocab_size: int
    teacher_dim: int
    student_parameters: int


class Superposition(Stage):
    name = "superposition"
    Manifest = SuperpositionManifest

    def check(self, pre: Preflight) -> None:
        if len(pre.config.cache.layers) > 1:
            raise ConfigError(f"cache.layers {pre.config.cache.layers}: the superposition student reconstructs one "
                              "teacher layer; list only that one (e.g. cache.layers: [-1])")
        check_optimizer(pre.config.train, resolve_device(pre.config.teacher.device))

    def settings(self, cfg: PipelineConfig, teacher: TeacherFacts) -> dict:
        return {"student": dataclasses.asdict(cfg.student), "train": cfg.train.fingerprinted(), "seed": cfg.seed}

    def resumes(self, cfg: PipelineConfig, store, path: str) -> str | None:
        return resumable_step(store, path, cfg.train.steps)

    def build(self, ctx: Context, cache: TeacherCacheManifest) -> Built:
        """The student, its decompressor and their loss over the cached states: what every training worker runs."""
        cfg = ctx.config
        target = f"hidden/layer_{cache.layers[-1]}"
        rows, eval_rows = (cached_rows(ctx.store, cache, split, [target]) for split in ("train", "eval"))
        student, projector = build_student(cfg, cache.vocab_size, cache.hidden_size)
        trainable = superposition_trainable(student, projector, cfg, rows, target, ctx.device, eval_rows)
        extra = {"target": target, "vocab_size": cache.vocab_size, "teacher_dim": cache.hidden_size,
                 "student_parameters": sum(p.numel() for p in student.parameters())}
        return Built(trainable, cfg.train, extra, self.name)

    def run(self, ctx: Context, cache: TeacherCacheManifest) -> SuperpositionManifest:
        history, state, extra = fit(ctx, self, cache=cache)
        return save_trained(ctx, SuperpositionManifest, self.name, history, state, **extra)


def load_trained_student(cfg: PipelineConfig, store, trained: SuperpositionManifest):
    """The student and decompressor as the superposition stage left them (full-precision latent weights)."""
    student, projector = build_student(cfg, trained.vocab_size, trained.teacher_dim)
    load_prefixed_state(read_tensors(store, trained.weights), student=student, projector=projector)
    return student, projector
