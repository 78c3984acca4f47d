"""Training step cost, side by side in one process (forward + backward + clipping + AdamW, medians of interleaved
rounds).

1. BitLinear vs nn.Linear: the superposition student (``bitnet.SuperpositionStudent``, every block projection a
   ``BitLinear``) against the very same architecture and weights with plain ``nn.Linear``. Target <= 1.3x. With a
   model-shaped teacher (``qwen2.5-1.5b-shape``...) the student takes that model's width, depth, heads, MLP width
   and vocabulary (its attention has no grouped KV heads: the K and V projections are full width).
   On CUDA with Triton installed, the Triton kernels (``BITNET_KERNEL=triton``) run as a further variant.
2. Self-distillation vs plain fine-tuning of the same Hugging Face model: the project's own self-distillation loss
   (``distill.stages.self_distill.self_distill_trainable`` with the quickstart preset's loss, KL to the teacher: a
   teacher-mode forward, then the student forward through ``bitnet.patch_model``, backward into dW) against full
   fine-tuning of an unpatched copy with cross-entropy. A third variant, the patched student with cross-entropy
   alone, separates the cost of ternary training from the cost of the teacher signal; a fourth runs
   self-distillation with activation checkpointing (``self_distill.activation_checkpointing``), whose cost is one
   more forward pass of the student's blocks; a fifth with torchao's 8-bit AdamW (``train.optimizer: adamw8bit``).
"""

from __future__ import annotations

import copy
import functools
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/train_step.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from bench.common import (MODEL_SHAPES, SHAPES, TEACHERS, VOCAB, interleave, median, model_config, parser, ratio,
                          report, setup, shape_arguments, stepper, table, teacher, token_rows)
from bitnet import BitLinear, SuperpositionStudent, next_token_cross_entropy, patch_model
from bitnet.quant import bitlinear_graph
from distill.config import load_config
from distill.rows import Rows
from distill.stages.self_distill import self_distill_trainable

TARGET = 1.3


class GraphBitLinear(BitLinear):
    """BitLinear as it was before the fused autograd node (``bitnet.quant.bitlinear_graph``: the straight-through
    quantizers composed by autograd, which saves fp32 copies of the quantized weight and activations and adds ~10
    elementwise passes over x and W per layer, forward and backward). Kept to measure what the fused node bought."""

    def forward(self, x):
        y = bitlinear_graph(x, self.weight, self.quant_lambda)
        return y + self.bias if self.bias is not None else y


def with_kernel(name: str, loss_of):
    """``loss_of`` with BitLinear's kernel set to ``name`` (``BITNET_KERNEL``, read in each layer's forward, which
    also fixes its backward), the variable as it was afterwards: variants of one process take turns."""

    def run():
        previous = os.environ.get("BITNET_KERNEL")
        os.environ["BITNET_KERNEL"] = name
        try:
            return loss_of()
        finally:
            if previous is None:
                os.environ.pop("BITNET_KERNEL")
            else:
                os.environ["BITNET_KERNEL"] = previous

    return run


def triton_available(device) -> bool:
    from bitnet import triton_bitlinear

    return device.type == "cuda" and triton_bitlinear.AVAILABLE


def student_shape(kind: str, args) -> dict:
    """The student's shape for ``kind``: a ``SHAPES`` entry (vocabulary ``VOCAB``), or a ``MODEL_SHAPES`` model's
    (its own vocabulary, ``--shape-layers`` blocks if given)."""
    if kind in MODEL_SHAPES:
        c = model_config(kind, args.shape_layers)
        return dict(vocab=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                    num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size)
    return dict(vocab=VOCAB, **SHAPES[kind])


def bitlinear_vs_linear(kind: str, batch: int, args, device) -> dict:
    shape = student_shape(kind, args)
    ids, mask = token_rows(batch, args.seq_len)
    ids, mask = ids.to(device), mask.to(device)
    torch.manual_seed(0)
    model = SuperpositionStudent(shape["vocab"], shape["hidden_size"], shape["num_hidden_layers"],
                                 shape["num_attention_heads"], mlp_hidden=shape["intermediate_size"],
                                 max_seq_len=args.seq_len).to(device)
    # One model and one optimiser for every variant: each step first gives the block projections the variant's
    # class (BitLinear subclasses nn.Linear and adds only its forward), so a variant costs no memory and a
    # 1.5B-shaped student is held once, not once per variant. The steps train the shared weights in turn, which
    # changes nothing in their cost.
    projections = [m for m in model.modules() if isinstance(m, BitLinear)]
    step = stepper(list(model.parameters()), lambda: next_token_cross_entropy(model(ids, mask).logits, ids, mask),
                   device)

    def step_as(cls: type) -> None:
        for module in projections:
            module.__class__ = cls
        step()

    variants = {"nn.Linear": nn.Linear, "BitLinear": BitLinear, "BitLinear, STE graph (before)": GraphBitLinear}
    steps = {name: functools.partial(step_as, cls) for name, cls in variants.items()}
    # "BitLinear" runs as the environment says (bitnet.quant.kernel_on_cuda: compiled by default); with Triton on a
    # GPU, the Triton kernels (BITNET_KERNEL=triton) too
    if triton_available(device):
        steps["BitLinear, Triton"] = with_kernel("triton", functools.partial(step_as, BitLinear))
    times = interleave(steps, args.repeats, device)  # the untimed warm-up round compiles and autotunes
    return {"model": f"superposition student ({kind if kind in MODEL_SHAPES else kind + ' shape'})", "dim": shape["hidden_size"],
            "layers": shape["num_hidden_layers"], "vocab": shape["vocab"], "batch": batch,
            "tokens": batch * args.seq_len, "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": times, "median_s": {k: median(v) for k, v in times.items()},
            "ratio": ratio(times["BitLinear"], times["nn.Linear"]),
            "ratio_graph": ratio(times["BitLinear, STE graph (before)"], times["nn.Linear"]),
            **({"ratio_triton": ratio(times["BitLinear, Triton"], times["nn.Linear"])}
               if "BitLinear, Triton" in times else {})}


def self_distill_vs_finetune(kind: str, batch: int, args, device) -> dict:
    model, info = teacher(kind, device, torch.float32, layers=args.shape_layers)  # fp32 master weights; bf16 autocast on CUDA
    ids, mask = token_rows(batch, args.seq_len)
    rows = Rows(batch, lambda index: {"input_ids": ids[index], "attention_mask": mask[index]})
    cfg = load_config("quickstart", {"train.batch_size": batch})
    dev_ids, dev_mask = ids.to(device), mask.to(device)

    finetune = copy.deepcopy(model).train().requires_grad_(True)
    dual = patch_model(copy.deepcopy(model).train(), delta=args.delta)
    trainable = self_distill_trainable(dual, cfg, rows, device)
    checkpointed = patch_model(copy.deepcopy(model).train(), delta=args.delta)
    checkpointed.enable_activation_checkpointing()
    trainable_checkpointed = self_distill_trainable(checkpointed, cfg, rows, device)
    eight_bit = self_distill_trainable(patch_model(copy.deepcopy(model).train(), delta=args.delta), cfg, rows, device)
    counter = iter(range(10**9))

    def student_ce():
        with dual.student():
            return next_token_cross_entropy(dual(input_ids=dev_ids, attention_mask=dev_mask, use_cache=False).logits,
                                            dev_ids, dev_mask)

    steps = {
        "fine-tune (CE)": stepper(list(finetune.parameters()),
                                  lambda: next_token_cross_entropy(finetune(input_ids=dev_ids, attention_mask=dev_mask,
                                                                            use_cache=False).logits, dev_ids, dev_mask),
                                  device),
        "ternary student (CE only)": stepper(dual.trainable_parameters(), student_ce, device),
        "self-distill": stepper(trainable.parameters, lambda: trainable.loss(next(counter))[0], device),
        "self-distill, checkpointed": stepper(trainable_checkpointed.parameters,
                                              lambda: trainable_checkpointed.loss(next(counter))[0], device),
        "self-distill, AdamW8bit": stepper(eight_bit.parameters, lambda: eight_bit.loss(next(counter))[0], device,
                                           optimizer="adamw8bit"),
    }
    times = interleave(steps, args.repeats, device)
    sd = cfg.self_distill
    return {**info, "batch": batch, "tokens": batch * args.seq_len, "delta": args.delta,
            "loss": f"ce {sd.ce_weight} + kl {sd.kl_weight} + hidden {sd.hidden_weight} ({sd.hidden_layers} layers)",
            "seconds": times, "median_s": {k: median(v) for k, v in times.items()},
            "ratio_self_distill": ratio(times["self-distill"], times["fine-tune (CE)"]),
            "ratio_student_only": ratio(times["ternary student (CE only)"], times["fine-tune (CE)"]),
            "ratio_checkpointed": ratio(times["self-distill, checkpointed"], times["self-distill"]),
            "ratio_adamw8bit": ratio(times["self-distill, AdamW8bit"], times["self-distill"])}


def triton_cells(r: dict) -> list:
    if "ratio_triton" not in r:
        return ["-", "-", "-"]  # not run: no GPU, or Triton not installed
    t = r["ratio_triton"]
    return [t["median"], f"{t['min']:.2f}-{t['max']:.2f}", "yes" if t["median"] <= TARGET else "no"]


def main(argv=None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["quickstart", "large"], choices=TEACHERS)
    shape_arguments(p)
    p.add_argument("--parts", nargs="+", default=["bitlinear", "self-distill"], choices=["bitlinear", "self-distill"],
                   help="which comparisons to run. self-distill holds five copies of the teacher with their AdamW "
                        "state: at a model shape's full depth, more memory than one GPU has")
    p.add_argument("--batch", type=int, default=16, help="rows per step, quickstart shape (quickstart preset: 16)")
    p.add_argument("--large-batch", type=int, default=4, help="rows per step, every other shape")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--delta", default="full", help="self-distillation delta: full or lora:R")
    p.set_defaults(repeats=7)
    args = p.parse_args(argv)
    device = setup(args)
    bit, sd = [], []
    for kind in args.shapes:
        batch = args.batch if kind == "quickstart" else args.large_batch
        if "bitlinear" in args.parts:
            print(f"{kind}: BitLinear vs nn.Linear, batch {batch} x {args.seq_len}", flush=True)
            bit.append(bitlinear_vs_linear(kind, batch, args, device))
        if "self-distill" in args.parts:
            print(f"{kind}: self-distillation vs fine-tuning", flush=True)
            sd.append(self_distill_vs_finetune(kind, batch, args, device))
    tables = {
        "BitLinear model step / nn.Linear model step (target <= 1.3x)": bit and table(
            ["model", "dim", "tokens/step", "nn.Linear s/step", "BitLinear s/step", "BitLinear / nn.Linear", "range",
             "meets target", "STE graph (before) / nn.Linear", "Triton / nn.Linear", "range", "Triton meets target"],
            [[r["model"], r["dim"], r["tokens"], r["median_s"]["nn.Linear"], r["median_s"]["BitLinear"],
              r["ratio"]["median"], f"{r['ratio']['min']:.2f}-{r['ratio']['max']:.2f}",
              "yes" if r["ratio"]["median"] <= TARGET else "no", r["ratio_graph"]["median"],
              *triton_cells(r)] for r in bit]),
        "Self-distillation step / plain fine-tuning step of the same model": sd and table(
            ["teacher", "weights", "tokens/step", "fine-tune s/step", "ternary CE-only s/step", "self-distill s/step",
             "CE-only / fine-tune", "self-distill / fine-tune", "range", "checkpointed / self-distill", "range",
             "AdamW8bit / AdamW", "range"],
            [[r["teacher"], r["source"], r["tokens"], r["median_s"]["fine-tune (CE)"],
              r["median_s"]["ternary student (CE only)"], r["median_s"]["self-distill"],
              r["ratio_student_only"]["median"], r["ratio_self_distill"]["median"],
              f"{r['ratio_self_distill']['min']:.2f}-{r['ratio_self_distill']['max']:.2f}",
              r["ratio_checkpointed"]["median"],
              f"{r['ratio_checkpointed']['min']:.2f}-{r['ratio_checkpointed']['max']:.2f}",
              r["ratio_adamw8bit"]["median"],
              f"{r['ratio_adamw8bit']['min']:.2f}-{r['ratio_adamw8bit']['max']:.2f}"] for r in sd]),
    }
    tables = {title: text for title, text in tables.items() if text}  # the parts that ran
    report("train_step", args, device, tables, {"bitlinear_vs_linear": bit, "self_distill_vs_finetune": sd})


if __name__ == "__main__":
    main()
