"""The self_distill stage: train dW so that the ternary student on W + dW imitates the original model.

loss = ce_weight * CE + kl_weight * KL(teacher || student, T) + hidden_weight * hidden cosine
       (+ magnitude_weight * log-norm term). The teacher signal is computed online by switching the same model
to teacher mode for each batch (no second model in memory), or read from the teacher cache.
"""

from __future__ import annotations

import logging

import torch

from bitnet import DualModel, hidden_cosine_loss, kl_to_teacher, next_token_cross_entropy, patch_model
from storage.cache_spec import LOGIT_ARRAYS

from ..config import ConfigError, PipelineConfig
from ..device import DTYPES, resolve_device
from ..distributed import Built, fit, shard_params
from ..loop import ScheduledBatches, Trainable, TrainedManifest, process_group, resumable_step, save_trained
from ..metrics import Output, compare_to_teacher
from ..optim import check_optimizer
from ..rows import Rows, cached_rows, to_device, token_rows
from ..stage import Context, Preflight, Stage
from ..teacher import Teacher, TeacherFacts, hidden_layers, resolve_layers
from .teacher_cache import TeacherCacheManifest, cached_logits_kl
from .tokenize import TokenizeManifest


def dual_forward(dual: DualModel, mode, layers: list[int]):
    """A metrics ``Forward`` running the dual model in the mode given by a context factory."""
    def forward(ids, mask) -> Output:
        with mode():  # no KV cache: nothing here generates, and a checkpointed block would append to it twice
            out = dual(input_ids=ids, attention_mask=mask, output_hidden_states=bool(layers), use_cache=False)
        return Output(out.logits, [out.hidden_states[i] for i in layers] if layers else None)
    return forward


def check_cache_holds_teacher_signal(cfg: PipelineConfig, num_hidden_layers: int) -> None:
    """``teacher_signal: cache`` trains from cached outputs only: the cache must hold every term the loss reads."""
    sd = cfg.self_distill
    if sd.kl_weight and not cfg.cache.topk:
        raise ConfigError("self_distill.teacher_signal 'cache' with kl_weight > 0 reads the teacher's logits "
                          "from the cache: set cache.topk > 0 (e.g. 64), or use teacher_signal: online")
    if sd.kl_weight and cfg.cache.logits == "sampled" and sd.temperature != 1:
        raise ConfigError(f"self_distill.temperature {sd.temperature} with cache.logits: sampled: the cached tokens "
                          "are drawn from the teacher at temperature 1, so their KL has no other: set "
                          "self_distill.temperature: 1, or cache.logits: topk")
    if sd.hidden_weight:
        cached = resolve_layers(cfg.cache.layers, num_hidden_layers)
        missing = [i for i in hidden_layers(sd.hidden_layers, num_hidden_layers) if i not in cached]
        if missing:
            raise ConfigError(f"self_distill.teacher_signal 'cache' with hidden_weight > 0 matches hidden states "
                              f"{missing}, which cache.layers {cfg.cache.layers} does not hold: add them to "
                              "cache.layers, or use teacher_signal: online")


def cached_signal_arrays(cfg: PipelineConfig, num_hidden_layers: int) -> list[str]:
    """The cached arrays the loss reads under ``teacher_signal: cache`` (besides the tokens)."""
    sd = cfg.self_distill
    layers = hidden_layers(sd.hidden_layers, num_hidden_layers) if sd.hidden_weight else []
    return [f"hidden/layer_{i}" for i in layers] + (list(LOGIT_ARRAYS[cfg.cache.logits]) if sd.kl_weight else [])


def self_distill_trainable(dual: DualModel, cfg: PipelineConfig, rows: Rows, device: torch.device,
                           eval_rows: Rows | None = None) -> Trainable:
    sd, optim = cfg.self_distill, cfg.train
    num_hidden_layers = dual.model.config.num_hidden_layers
    layers = hidden_layers(sd.hidden_layers, num_hidden_layers) if sd.hidden_weight else []
    batches = ScheduledBatches(rows, optim.batch_size, cfg.seed)
    teacher = dual_forward(dual, dual.teacher, layers)
    student = dual_forward(dual, dual.student, layers)

    def teacher_signal(batch, ids, mask) -> tuple[Output, dict]:
        if sd.teacher_signal == "online":
            with torch.no_grad():
                return teacher(ids, mask), {}
        return Output(None, [batch[f"hidden/layer_{i}"] for i in layers]), batch

    def loss(micro_step: int):
        if sd.quant_warmup_steps:
            dual.set_quant_lambda(min(1.0, (micro_step // optim.grad_accum) / sd.quant_warmup_steps))
        batch = to_device(batches(micro_step), device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        target, cached = teacher_signal(batch, ids, mask)
        out = student(ids, mask)
        terms = {}
        if sd.ce_weight:
            terms["ce"] = (sd.ce_weight, next_token_cross_entropy(out.logits, ids, mask))
        if sd.kl_weight:
            kl = (cached_logits_kl(out.logits, cached, mask, sd.temperature)
                  if cached else kl_to_teacher(out.logits, target.logits, mask, sd.temperature))
            terms["kl"] = (sd.kl_weight, kl)
        if layers:
            cosine = hidden_cosine_loss(out.hidden, [t.to(s.dtype) for s, t in zip(out.hidden, target.hidden)], mask,
                                        magnitude_weight=sd.magnitude_weight / sd.hidden_weight)
            terms["hidden"] = (sd.hidden_weight, cosine)
        total = sum(weight * value for weight, value in terms.values())
        return total, {name: value.item() for name, (_, value) in terms.items()}

    def evaluate() -> dict[str, float]:
        batches = ((b["input_ids"].to(device), b["attention_mask"].to(device))
                   for b in eval_rows.batches(optim.batch_size, limit=4 * optim.batch_size))
        result = compare_to_teacher(teacher, {"student": student}, batches)["student"]
        return {k: v for k, v in result.items() if k in ("loss", "perplexity", "kl_to_teacher", "top1_agreement")}

    return Trainable(
        parameters=dual.trainable_parameters(),
        loss=loss,
        state=dual.delta_state_dict,
        load_state=dual.load_delta_state_dict,
        evaluate=evaluate if eval_rows is not None and eval_rows.count else None,
        compute_dtype=dual.model.dtype,  # teacher.dtype: float16 turns on loss scaling
    )


def load_dual(cfg: PipelineConfig, teacher: Teacher, device: torch.device) -> DualModel:
    """The teacher's weights patched into the dual-mode model (dW = 0): the original in teacher mode."""
    # patching wraps the full-precision weights: teacher.load_in_4bit is for the cache stage's forward passes only
    model = teacher.load(device, in_4bit=False)
    sd = cfg.self_distill
    # LoRA's A starts random: drawn from the run's seed, not from whatever this process drew before (a served
    # flow's process runs many), so that a seed names one initialisation and a rerun from step 0 repeats it.
    torch.manual_seed(cfg.seed)
    return patch_model(model, delta=sd.delta, delta_dtype=DTYPES[sd.delta_dtype])


# Norms and biases are well under 1% of a transformer's block parameters; far more means whole weight matrices
# (MoE experts stored as 3-D tensors, linear subclasses) that patching leaves in full precision.
FULL_PRECISION_WARNING = 0.05


class SelfDistillManifest(TrainedManifest):
    num_patched: int
    trainable_parameters: int
    full_precision_block_share: float


class SelfDistill(Stage):
    name = "self_distill"
    Manifest = SelfDistillManifest

    def check(self, pre: Preflight) -> None:
        cfg, layers = pre.config, pre.facts.num_hidden_layers
        check_optimizer(cfg.train, resolve_device(cfg.teacher.device))
        if cfg.self_distill.hidden_layers != "all":
            hidden_layers(cfg.self_distill.hidden_layers, layers)
        if cfg.self_distill.teacher_signal == "cache":
            check_cache_holds_teacher_signal(cfg, layers)
        check_exportable(pre.teacher)

    def settings(self, cfg: PipelineConfig, teacher: TeacherFacts) -> dict:
        # steps, lr and min_lr_ratio enter resolved into the optimiser's settings (self_distill_optim), so that one
        # schedule is one run however it was spelled
        own = cfg.self_distill.fingerprinted(exclude=("steps", "lr", "min_lr_ratio"))
        return {"teacher": teacher.identity, "compute_dtype": teacher.compute_dtype, "self_distill": own,
                "train": cfg.self_distill_optim().fingerprinted(), "seed": cfg.seed}

    def resumes(self, cfg: PipelineConfig, store, path: str) -> str | None:
        return resumable_step(store, path, cfg.self_distill_optim().steps)

    def build(self, ctx: Context, tokens: TokenizeManifest, cache: TeacherCacheManifest | None = None) -> Built:
        """The dual-mode model and its loss over the training rows: what every training worker runs."""
        cfg, store, device = ctx.config, ctx.store, ctx.device
        dual = load_dual(cfg, ctx.teacher, device)
        share, kept = dual.full_precision_share()
        if share > FULL_PRECISION_WARNING:
            largest = ", ".join(f"{kind} {count:,}" for kind, count in sorted(kept.items(), key=lambda kv: -kv[1])[:3])
            ctx.reporter.log(f"self_distill: {share:.0%} of the transformer blocks' parameters stay in full precision "
                             f"in the student (not held by a plain nn.Linear: {largest}); only the {dual.num_patched} "
                             "patched linear layers become ternary, and the packed size counts only them",
                             logging.WARNING)
        if cfg.self_distill.activation_checkpointing:
            blocks = dual.enable_activation_checkpointing()
            ctx.reporter.log(f"self_distill: activation checkpointing of {blocks} transformer blocks (recomputed in "
                             "backward)")
        rank, world = process_group()
        sharded = cfg.compute.shard_params and world > 1
        if sharded:
            blocks = shard_params(dual, device)
            if rank == 0:
                ctx.reporter.log(f"self_distill: parameters, dW's gradients and optimiser state sharded over "
                                 f"{world} workers (FSDP2, {blocks} blocks)")
        elif cfg.compute.shard_params:
            ctx.reporter.log("self_distill: compute.shard_params has nothing to shard on one process: it applies to "
                             "the workers of compute.backend ray, or of torchrun", logging.WARNING)
        if cfg.self_distill.teacher_signal == "cache":
            rows = cached_rows(store, cache, "train", cached_signal_arrays(cfg, dual.model.config.num_hidden_layers))
        else:
            rows = token_rows(store, tokens, "train")
        trainable = self_distill_trainable(dual, cfg, rows, device, token_rows(store, tokens, "eval"))
        trainable.sharded = sharded
        extra = {"num_patched": dual.num_patched, "full_precision_block_share": share,
                 "trainable_parameters": sum(p.numel() for p in dual.trainable_parameters())}
        return Built(trainable, cfg.self_distill_optim(), extra, self.name)

    def run(self, ctx: Context, tokens: TokenizeManifest,
            cache: TeacherCacheManifest | None = None) -> SelfDistillManifest:
        history, delta, extra = fit(ctx, self, tokens=tokens, cache=cache)
        return save_trained(ctx, SelfDistillManifest, self.name, history, delta, **extra)


def check_exportable(teacher: Teacher) -> None:
    """Before any work: a self-distilled student of this architecture can be exported (transformers' packed layout
    needs every patched layer's output size divisible by 4). Checked on the model built on the meta device from the
    teacher's config: no weights are loaded or allocated. A model whose class cannot be built so is left to the
    export."""
    from transformers import AutoModelForCausalLM

    from bitnet import unpackable_layers

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(teacher.config, trust_remote_code=teacher.cfg.trust_remote_code)
    except Exception:  # remote code or an architecture that needs real tensors to build
        return
    uneven = unpackable_layers(model)
    if uneven:
        raise ConfigError(
            f"teacher.name_or_path {teacher.cfg.name_or_path!r}: its self-distilled student could not be exported, "
            f"since transformers' packed ternary layout stores out_features // 4 rows and these layers' output sizes "
            f"are not divisible by 4: {', '.join(uneven[:5])}{' ...' if len(uneven) > 5 else ''}; distil it with "
            "the superposition flow (its student has sizes of its own), or pick a teacher without such layers")
