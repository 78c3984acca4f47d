"""The superposition stage: a small BitNet student plus a decompressor learn to reconstruct the teacher's cached
hidden states (cosine loss, padding-masked), reading batches from the teacher cache; optionally starting cut out of
the teacher (``superposition.init: teacher``), with a KL term to the cached teacher logits through the student's own
head (``superposition.kl_weight``), and matching inner teacher layers too (``cache.layers``)."""

from __future__ import annotations

import dataclasses

import torch

from bitnet import Decompressor, SuperpositionStudent, hidden_cosine_loss
from bitnet.student_init import derivation_problems, init_from_teacher, matched_layers, teacher_statistics
from storage.tensors import read_tensors

from ..config import ConfigError, PipelineConfig
from ..device import resolve_device
from ..distributed import Built, fit
from ..loop import ScheduledBatches, Trainable, TrainedManifest, resumable_step, save_trained
from ..optim import check_optimizer
from ..rows import Rows, cached_rows, to_device
from ..stage import Context, Preflight, Stage
from ..teacher import TeacherFacts, resolve_layers
from .teacher_cache import TeacherCacheManifest, cached_logits_kl


def build_student(cfg: PipelineConfig, vocab_size: int, teacher_dim: int) -> tuple[SuperpositionStudent, Decompressor]:
    """The student (``student.*`` with the teacher's vocabulary and ``data.seq_len``), initialised from the run's
    seed, and its decompressor to the teacher's width."""
    shape = cfg.student_shape(vocab_size)
    torch.manual_seed(cfg.seed)
    student = SuperpositionStudent(**dataclasses.asdict(shape))
    return student, Decompressor(shape.dim, teacher_dim, shape.projector_hidden)


def inner_targets(cfg: PipelineConfig, layers: list[int], student: SuperpositionStudent, projector: Decompressor,
                  teacher_dim: int) -> dict[int, tuple[int, Decompressor]]:
    """The inner teacher layers matched besides the target (every cached layer but the deepest): each ->
    the student state matched with it and the decompressor it goes through, its own or the target's
    (``superposition.projectors``)."""
    *inner_layers, target_layer = layers
    matched = matched_layers(inner_layers, target_layer, student.config.n_layers)
    own = cfg.superposition.projectors == "own"
    return {j: (matched[j], Decompressor(student.config.dim, teacher_dim, student.config.projector_hidden) if own
                else projector) for j in inner_layers}


def prefixed_state(**modules: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy (tied weights must not share memory in safetensors) of the modules' states, names prefixed."""
    return {f"{name}.{k}": v.detach().clone() for name, m in modules.items() for k, v in m.state_dict().items()}


def load_prefixed_state(state: dict[str, torch.Tensor], **modules: torch.nn.Module) -> None:
    for name, module in modules.items():
        module.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})


def cut_from_teacher(ctx: Context, student: SuperpositionStudent, projector: Decompressor, rows: Rows,
                     target_layer: int, inner: dict[int, Decompressor]) -> dict:
    """``superposition.init: teacher``: overwrite the student and decompressors with the teacher cut down to the
    student's shape, ranked on the first ``superposition.calibration_rows`` training rows. Returns what was kept."""
    cfg = ctx.config
    teacher = ctx.teacher.load(ctx.device, in_4bit=False)
    n = min(cfg.superposition.calibration_rows, rows.count)
    batches = ((b["input_ids"].to(ctx.device), b["attention_mask"].to(ctx.device))
               for b in rows.batches(cfg.train.batch_size, limit=n))
    chosen = init_from_teacher(student, projector, teacher, teacher_statistics(teacher, batches), target_layer, inner)
    ctx.reporter.log(f"student cut out of the teacher: blocks {chosen['teacher_blocks']}, "
                     f"{chosen['residual_energy_kept']:.1%} of the residual stream's energy kept, "
                     f"{chosen['calibration_tokens']} calibration tokens")
    return chosen


def reconstruction_loss(student, projector, batch: dict, target_key: str, kl_weight: float = 0.0,
                        inner: dict[int, tuple[int, Decompressor]] | None = None,
                        teacher_head: torch.Tensor | None = None):
    """``(loss, metrics)``: 1 - cosine to the target states (and, averaged with it, to each inner teacher layer in
    ``inner``: its index -> the student state matched with it and the decompressor it goes through), plus
    ``kl_weight`` times the sparse KL to the cached teacher logits of the student's own logits or, given the teacher's
    output embedding ``teacher_head``, of the decompressed target states read by it."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    own_logits = bool(kl_weight) and teacher_head is None
    out = student(ids, mask, compute_logits=own_logits, output_hidden_states=bool(inner))
    predicted, targets = [projector(out.last_hidden)], [batch[target_key]]
    for j, (i, inner_projector) in (inner or {}).items():
        predicted.append(inner_projector(out.hidden_states[i]))
        targets.append(batch[f"hidden/layer_{j}"])
    cosine = hidden_cosine_loss(predicted, [t.to(out.last_hidden.dtype) for t in targets], mask)
    if not kl_weight:
        return cosine, {}
    logits = out.logits if own_logits else torch.nn.functional.linear(predicted[0], teacher_head)
    kl = cached_logits_kl(logits, batch, mask)
    return cosine + kl_weight * kl, {"cosine_loss": cosine.item(), "logit_kl": kl.item()}


def superposition_trainable(student: SuperpositionStudent, projector: Decompressor, cfg: PipelineConfig,
                            rows: Rows, target_key: str, device: torch.device, eval_rows: Rows | None = None,
                            inner: dict[int, tuple[int, Decompressor]] | None = None,
                            teacher_head: torch.Tensor | None = None) -> Trainable:
    """The reconstruction's loss; ``inner``: the inner teacher layers matched too, ``teacher_head``: the head the KL
    term reads, when not the student's (``reconstruction_loss``)."""
    batches = ScheduledBatches(rows, cfg.train.batch_size, cfg.seed)
    kl_weight = cfg.superposition.kl_weight
    inner = inner or {}
    # the inner layers' own decompressors train with the rest and are checkpointed beside it; only training needs them
    modules = {"student": student, "projector": projector,
               **{f"projector_{j}": p for j, (_, p) in inner.items() if p is not projector}}
    for module in modules.values():
        module.to(device).train()

    def loss(micro_step: int):
        batch = to_device(batches(micro_step), device)
        return reconstruction_loss(student, projector, batch, target_key, kl_weight, inner, teacher_head)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        student.eval(), projector.eval()
        losses = [reconstruction_loss(student, projector, to_device(b, device), target_key)[0].item()
                  for b in eval_rows.batches(cfg.train.batch_size, limit=4 * cfg.train.batch_size)]
        student.train(), projector.train()
        return {"cosine_loss": sum(losses) / len(losses)}

    return Trainable(
        parameters=[p for module in modules.values() for p in module.parameters()],
        loss=loss,
        state=lambda: prefixed_state(**modules),
        load_state=lambda state: load_prefixed_state(state, **modules),
        evaluate=evaluate if eval_rows is not None and eval_rows.count else None,
    )


class SuperpositionManifest(TrainedManifest):
    target: str  # the cached array the student reconstructs: hidden/layer_<i>
    vocab_size: int
    teacher_dim: int
    student_parameters: int
    cut_from_teacher: dict | None = None  # superposition.init: teacher: the blocks, heads and energy kept
    matched: dict[int, int] = {}  # inner teacher layers reconstructed too: hidden_states index -> the student's


class Superposition(Stage):
    name = "superposition"
    Manifest = SuperpositionManifest

    def check(self, pre: Preflight) -> None:
        cfg = pre.config
        target = resolve_layers(cfg.cache.layers, pre.facts.num_hidden_layers)[-1]
        if target == 0:
            raise ConfigError(f"cache.layers {cfg.cache.layers}: the superposition student reconstructs the deepest "
                              "listed layer, here the embeddings (0); list a block's output, e.g. cache.layers: [-1]")
        if cfg.superposition.kl_weight and cfg.superposition.kl_head == "teacher" \
                and target != pre.facts.num_hidden_layers:
            raise ConfigError(f"superposition.kl_head: teacher reads the reconstructed states with the teacher's head, "
                              f"which reads its last layer ({pre.facts.num_hidden_layers}), not {target}: end "
                              "cache.layers with -1, or set superposition.kl_head: student")
        if cfg.superposition.kl_weight and not cfg.cache.topk:
            raise ConfigError("superposition.kl_weight > 0 needs cached teacher logits: set cache.topk > 0 "
                              "(e.g. 32) or superposition.kl_weight: 0")
        if cfg.superposition.init == "teacher":
            shape = cfg.student_shape(pre.facts.vocab_size)
            projector_width = shape.projector_hidden or pre.facts.hidden_size
            problems = derivation_problems(pre.teacher.text_config, shape, projector_width)
            if shape.n_layers > target:
                problems.append(f"student.n_layers {shape.n_layers} exceeds the {target} teacher blocks below the "
                                f"reconstructed layer (cache.layers {cfg.cache.layers}): give at most {target}")
            if problems:
                raise ConfigError("superposition.init: teacher cannot cut this student out of the teacher: "
                                  + "; ".join(problems) + " (or set superposition.init: random)")
        check_optimizer(cfg.train, resolve_device(cfg.teacher.device))

    def settings(self, cfg: PipelineConfig, teacher: TeacherFacts) -> dict:
        return {"student": dataclasses.asdict(cfg.student), "train": cfg.train.fingerprinted(), "seed": cfg.seed,
                "superposition": cfg.superposition.fingerprinted()}

    def resumes(self, cfg: PipelineConfig, store, path: str) -> str | None:
        return resumable_step(store, path, cfg.train.steps)

    def build(self, ctx: Context, cache: TeacherCacheManifest) -> Built:
        """The student, its decompressor and their loss over the cached states: what every training worker runs."""
        cfg = ctx.config
        target_layer = cache.layers[-1]  # the deepest is the target; the others are matched too
        target = f"hidden/layer_{target_layer}"
        arrays = [f"hidden/layer_{j}" for j in cache.layers]
        if cfg.superposition.kl_weight:
            arrays += cache.logit_arrays()
        # the held-out loss logged while training is the target's cosine alone
        rows = cached_rows(ctx.store, cache, "train", arrays)
        eval_rows = cached_rows(ctx.store, cache, "eval", [target])
        student, projector = build_student(cfg, cache.vocab_size, cache.hidden_size)
        inner = inner_targets(cfg, cache.layers, student, projector, cache.hidden_size)
        own_projectors = {j: p for j, (_, p) in inner.items() if p is not projector}
        cut = cut_from_teacher(ctx, student, projector, rows, target_layer, own_projectors) \
            if cfg.superposition.init == "teacher" else None
        teacher_head = None
        if cfg.superposition.kl_weight and cfg.superposition.kl_head == "teacher":
            teacher = ctx.teacher.load(ctx.device, in_4bit=False)
            teacher_head = teacher.get_output_embeddings().weight.detach().float().clone()
            del teacher
        trainable = superposition_trainable(student, projector, cfg, rows, target, ctx.device, eval_rows, inner,
                                            teacher_head)
        extra = {"target": target, "vocab_size": cache.vocab_size, "teacher_dim": cache.hidden_size,
                 "student_parameters": sum(p.numel() for p in student.parameters()), "cut_from_teacher": cut,
                 "matched": {j: i for j, (i, _) in inner.items()}}
        return Built(trainable, cfg.train, extra, self.name)

    def run(self, ctx: Context, cache: TeacherCacheManifest) -> SuperpositionManifest:
        history, state, extra = fit(ctx, self, cache=cache)
        return save_trained(ctx, SuperpositionManifest, self.name, history, state, **extra)


def load_trained_student(cfg: PipelineConfig, store, trained: SuperpositionManifest):
    """The student and decompressor as the superposition stage left them (full-precision latent weights)."""
    student, projector = build_student(cfg, trained.vocab_size, trained.teacher_dim)
    load_prefixed_state(read_tensors(store, trained.weights), student=student, projector=projector)
    return student, projector
