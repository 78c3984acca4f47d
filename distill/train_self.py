"""Self-distillation: train dW so that the ternary student on W + dW imitates the original model.

loss = ce_weight * CE + kl_weight * KL(teacher || student, T) + hidden_weight * hidden cosine
       (+ magnitude_weight * log-norm term). The teacher signal is computed online by switching the same model
to teacher mode for each batch (no second model in memory), or read from the teacher cache.
"""

from __future__ import annotations

import logging

import torch

from bitnet import DualModel, hidden_cosine_loss, kl_to_teacher, next_token_cross_entropy, sparse_topk_kl

from .config import ConfigError, PipelineConfig
from .loop import ScheduledBatches, Trainable
from .metrics import Output, compare_to_teacher
from .rows import Rows, to_device
from .teacher import hidden_layers, resolve_layers


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
        raise ConfigError("self_distill.teacher_signal 'cache' with kl_weight > 0 reads the teacher's top-k logits "
                          "from the cache: set cache.topk > 0 (e.g. 64), or use teacher_signal: online")
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
    return [f"hidden/layer_{i}" for i in layers] + (["topk_values", "topk_indices"] if sd.kl_weight else [])


def self_distill_trainable(dual: DualModel, cfg: PipelineConfig, rows: Rows, device: torch.device,
                           eval_rows: Rows | None = None) -> Trainable:
    sd, optim = cfg.self_distill, cfg.train
    num_hidden_layers = dual.model.config.num_hidden_layers
    if sd.teacher_signal == "cache":
        check_cache_holds_teacher_signal(cfg, num_hidden_layers)
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
            kl = (sparse_topk_kl(out.logits, cached["topk_values"], cached["topk_indices"], mask, sd.temperature)
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


def load_dual(cfg: PipelineConfig, device: torch.device) -> DualModel:
    from bitnet import patch_model

    from .teacher import DTYPES, load_teacher, resolve_dtype

    # patching wraps the full-precision weights: teacher.load_in_4bit is for the cache stage's forward passes only
    teacher = cfg.teacher.model_copy(update={"load_in_4bit": False})
    model = load_teacher(teacher, device, resolve_dtype(teacher.dtype, device))
    sd = cfg.self_distill
    # LoRA's A starts random: drawn from the run's seed, not from whatever this process drew before (a served
    # flow's process runs many), so that a seed names one initialisation and a rerun from step 0 repeats it.
    torch.manual_seed(cfg.seed)
    return patch_model(model, delta=sd.delta, delta_dtype=DTYPES[sd.delta_dtype])


# Norms and biases are well under 1% of a transformer's block parameters; far more means whole weight matrices
# (MoE experts stored as 3-D tensors, linear subclasses) that patching leaves in full precision.
FULL_PRECISION_WARNING = 0.05


def run_self_distill(cfg: PipelineConfig, store, stage: dict, reporter, tokens: dict, cache: dict | None) -> dict:
    """The self-distillation training stage: trains dW; writes the (small) delta and the loss history."""
    from .artifacts import finish_training
    from .data import load_split
    from .loop import train
    from .teacher import resolve_device
    from .teacher_cache import cached_rows

    if store.is_complete(stage["path"]):
        return store.read_manifest(stage["path"])
    device = resolve_device(cfg.teacher.device)
    dual = load_dual(cfg, device)
    share, kept = dual.full_precision_share()
    if share > FULL_PRECISION_WARNING:
        largest = ", ".join(f"{kind} {count:,}" for kind, count in sorted(kept.items(), key=lambda kv: -kv[1])[:3])
        reporter.log(f"self-distill: {share:.0%} of the transformer blocks' parameters stay in full precision in the "
                     f"student (not held by a plain nn.Linear: {largest}); only the {dual.num_patched} patched linear "
                     "layers become ternary, and the packed size counts only them", logging.WARNING)
    if cfg.self_distill.activation_checkpointing:
        blocks = dual.enable_activation_checkpointing()
        reporter.log(f"self-distill: activation checkpointing of {blocks} transformer blocks (recomputed in backward)")
    if cfg.self_distill.teacher_signal == "cache":
        arrays = cached_signal_arrays(cfg, dual.model.config.num_hidden_layers)
        rows = cached_rows(store, cache, "train", cache["fingerprint"], arrays)
    else:
        rows = load_split(store, tokens, "train")
    trainable = self_distill_trainable(dual, cfg, rows, device, load_split(store, tokens, "eval"))
    history = train(trainable, cfg.self_distill_optim(), store, stage["checkpoint_run"], reporter, device,
                    "self-distill")
    return finish_training(store, stage, history, dual.delta_state_dict(), num_patched=dual.num_patched,
                           trainable_parameters=sum(p.numel() for p in dual.trainable_parameters()),
                           full_precision_block_share=share)
