"""Peak memory of self-distillation: one dual-mode model vs a frozen teacher plus a separate student.

Each configuration runs in a fresh process (``--child``): build the model(s), then a few steps of the project's
self-distillation loss (``distill.stages.self_distill.self_distill_trainable`` with the quickstart preset's loss, KL to the
teacher: teacher forward, student forward, backward, clipping, AdamW), and report the process's peak resident set
size (``ru_maxrss``; on CUDA also ``torch.cuda.max_memory_allocated``). The two-model approach runs through the very same
loss code: ``TwoModels`` plays the ``DualModel`` role, teacher mode calling the frozen copy, student mode the
student (the teacher's architecture with every block ``nn.Linear`` a trainable ``BitLinear`` on its own copy of the
weights; the same parameters train as with ``delta=full``). Target: ``delta=lora:R`` <= 0.4x of two-model.

Two "(before)" configurations run BitLinear's straight-through step as the autograd graph it was before the fused
node (``bitnet.quant.bitlinear_graph``), to show what saving int8 codes instead of fp32 copies buys. The
"checkpointed" configurations recompute each block's activations in backward
(``self_distill.activation_checkpointing``; for the two-model approach, the student's blocks alike), and are
compared with the checkpointed two-model run. The "AdamW8bit" configurations train with torchao's 8-bit AdamW
(``train.optimizer: adamw8bit``), its step compiled as torchao runs it, or ``eager`` (``TORCHDYNAMO_DISABLE=1``:
no compiler in the process, so the peak is the state's, not the compiler's).

Children run with ``MALLOC_MMAP_THRESHOLD_=65536`` by default (``--malloc mmap``): every large tensor is its own
mapping, returned to the system when freed, so the peak RSS follows the tensors alive at the peak. glibc's default
(``--malloc default``) raises that threshold as tensors are freed, then serves them from the heap, where freed
memory stays resident: peaks come out 30-50% higher and depend on the order of frees more than on the method.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/memory.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from bench.common import (REPO, VOCAB, compute_dtype, optimiser_step, parser, peak_rss_mib, report, setup, table,
                          teacher)
from bitnet import BitLinear, checkpoint_blocks, find_block_linears, find_block_lists, patch_model
from distill.config import load_config
from distill.optim import make_optimizer
from distill.rows import Rows
from distill.stages.self_distill import self_distill_trainable

TARGET_LORA = 0.4
CONFIGS = ("two-model", "dual full", "dual full, bf16 dW", "dual lora", "two-model, STE graph (before)",
           "dual lora, STE graph (before)", "two-model, checkpointed", "dual full, checkpointed",
           "dual lora, checkpointed", "dual full, AdamW8bit", "dual full, AdamW8bit, eager",
           "dual full, bf16 dW, AdamW8bit")


class TwoModels:
    """The two-model approach behind the ``DualModel`` interface that ``self_distill_trainable`` uses."""

    def __init__(self, teacher_model: nn.Module, student_model: nn.Module):
        self.teacher_model, self.model = teacher_model, student_model
        self._active = student_model

    def __call__(self, *args, **kwargs):
        return self._active(*args, **kwargs)

    @contextmanager
    def _use(self, model: nn.Module):
        previous, self._active = self._active, model
        try:
            yield self
        finally:
            self._active = previous

    def teacher(self):
        return self._use(self.teacher_model)

    def student(self):
        return self._use(self.model)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def delta_state_dict(self) -> dict:
        return {}

    def load_delta_state_dict(self, state: dict) -> None:
        pass


def separate_student(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every block nn.Linear replaced by a trainable BitLinear holding its own weights."""
    student = copy.deepcopy(model).requires_grad_(False)
    for name in find_block_linears(student):
        linear = student.get_submodule(name)
        bit = BitLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        device=linear.weight.device, dtype=linear.weight.dtype)
        bit.weight = nn.Parameter(linear.weight.detach(), requires_grad=True)
        if linear.bias is not None:
            bit.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(student.get_submodule(parent), child, bit)
    return student.train()


def use_ste_graph() -> None:
    """Make every BitLinear and DualModeLinear run the composed straight-through graph (the code before the fused
    autograd node)."""
    import bitnet.layers
    from bitnet.quant import bitlinear_graph

    def graph(x, weight, bias=None, lam=1.0):
        y = bitlinear_graph(x, weight, lam)
        return y + bias if bias is not None else y

    bitnet.layers.bitlinear = graph


def plain_tensors(tensors):
    """The tensors themselves, or what a tensor subclass (an 8-bit optimiser state) is made of."""
    for t in tensors:
        if hasattr(type(t), "__tensor_flatten__"):
            yield from plain_tensors(getattr(t, name) for name in t.__tensor_flatten__()[0])
        else:
            yield t


def unique_bytes(tensors) -> int:
    seen = {}
    for t in plain_tensors(tensors):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def child(args) -> dict:
    """One configuration in this (fresh) process; prints its measurements as one JSON line."""
    device = setup(args)
    if "STE graph" in args.child:
        use_ste_graph()
    # Random token ids (memory does not depend on their values): tokenizing the corpus here would raise the peak
    # before the baseline is taken.
    ids = torch.randint(4, VOCAB, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    import transformers  # imported (with the Llama modeling code) before the baseline: not part of any method's cost

    transformers.LlamaForCausalLM  # noqa: B018 (lazy module: this loads it)
    baseline = peak_rss_mib()
    model, info = teacher(args.teacher, device, compute_dtype(device))
    checkpointed = "checkpointed" in args.child
    if args.child.startswith("two-model"):
        trained = TwoModels(model, separate_student(model))
        models = [trained.teacher_model, trained.model]
        if checkpointed:  # the student's blocks, as the dual model's (the teacher runs without gradients anyway)
            checkpoint_blocks(trained.model, find_block_lists(trained.model))
    else:
        delta = f"lora:{args.rank}" if args.child.startswith("dual lora") else "full"
        delta_dtype = torch.bfloat16 if "bf16" in args.child else torch.float32
        trained = patch_model(model.train(), delta=delta, delta_dtype=delta_dtype)
        models = [trained.model]
        if checkpointed:
            trained.enable_activation_checkpointing()
    built = peak_rss_mib()
    rows = Rows(args.batch, lambda index: {"input_ids": ids[index], "attention_mask": mask[index]})
    optimizer_name = "adamw8bit" if "AdamW8bit" in args.child else "adamw"
    cfg = load_config("quickstart", {"train.batch_size": args.batch, "train.optimizer": optimizer_name,
                                     "train.lr": 1e-4})
    trainable = self_distill_trainable(trained, cfg, rows, device)
    optimizer = make_optimizer(trainable.parameters, cfg.train)  # the pipeline's
    for step in range(args.steps):
        optimiser_step(trainable.parameters, optimizer, lambda: trainable.loss(step)[0], device)
    weights = unique_bytes([t for m in models for t in (*m.parameters(), *m.buffers())])
    trainable_bytes = unique_bytes(trainable.parameters)
    optimizer_bytes = unique_bytes([v for state in optimizer.state.values() for v in state.values()
                                    if torch.is_tensor(v) and v.numel() > 1])
    result = {"config": args.child, **info, "batch": args.batch, "baseline_mib": baseline, "built_mib": built,
              "peak_mib": peak_rss_mib(), "trainable_parameters": sum(p.numel() for p in trainable.parameters),
              # what must be alive at the peak whatever the activations: every weight (frozen and trainable), one
              # gradient per trainable parameter, AdamW's two moments
              "weights_mib": weights / 2**20, "gradients_mib": trainable_bytes / 2**20,
              "optimizer_mib": optimizer_bytes / 2**20, "malloc": os.environ.get("MALLOC_MMAP_THRESHOLD_", "default")}
    result["state_mib"] = result["weights_mib"] + result["gradients_mib"] + result["optimizer_mib"]
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(result))
    return result


def run_child(config: str, batch: int, args) -> dict:
    command = [sys.executable, "-m", "bench.memory", "--child", config, "--teacher", args.teacher,
               "--batch", str(batch), "--seq-len", str(args.seq_len), "--rank", str(args.rank),
               "--steps", str(args.steps), "--device", args.device, "--threads", str(args.threads)]
    env = dict(os.environ)
    if config.endswith(", eager"):  # torchao's optimiser step uncompiled: no compiler's memory in the peak
        env["TORCHDYNAMO_DISABLE"] = "1"
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if args.malloc == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise RuntimeError(f"{config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--teachers", nargs="+", default=["quickstart", "large"], choices=["quickstart", "large"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="rows per step (each batch size in turn)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank R of delta=lora:R")
    p.add_argument("--steps", type=int, default=3, help="optimiser steps per configuration (peak by step 2)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--malloc", default="mmap", choices=["mmap", "default"],
                   help="mmap: children run with MALLOC_MMAP_THRESHOLD_=65536 (RSS follows live tensors); default: "
                        "glibc's dynamic threshold")
    p.add_argument("--child", choices=CONFIGS, help="(internal) run one configuration in this process")
    p.add_argument("--teacher", default="quickstart", help="(with --child) which teacher")
    args = p.parse_args(argv)
    if args.child:
        args.batch = args.batch[0]
        child(args)
        return
    device = setup(args)
    configs = ["two-model", *(c for c in args.configs if c != "two-model")]
    measured, rows = [], []
    for kind in args.teachers:
        args.teacher = kind
        for batch in args.batch:
            results = {}
            for config in configs:
                print(f"{kind}, batch {batch}: {config}", end="", flush=True)
                started = time.perf_counter()
                results[config] = r = run_child(config, batch, args)
                # as each child ends: the figures survive a run stopped before its tables
                cuda = f", CUDA peak {r['cuda_peak_mib']:,.0f} MiB" if "cuda_peak_mib" in r else ""
                print(f": peak RSS {r['peak_mib']:,.0f} MiB{cuda} ({time.perf_counter() - started:.0f} s)", flush=True)
            for config, r in results.items():
                # a checkpointed configuration is compared with the two-model approach checkpointed alike
                base_name = "two-model, checkpointed" if "checkpointed" in config else "two-model"
                base = results.get(base_name, results["two-model"])
                base_net = base["peak_mib"] - base["baseline_mib"]
                name = config.replace("dual lora", f"dual lora:{args.rank}")
                net = r["peak_mib"] - r["baseline_mib"]
                rows.append([kind, batch, name, r["trainable_parameters"], r["weights_mib"],
                             r["gradients_mib"] + r["optimizer_mib"], net, net - r["state_mib"], r["peak_mib"],
                             base["config"], net / base_net, r["peak_mib"] / base["peak_mib"],
                             *([r["cuda_peak_mib"], r["cuda_peak_mib"] / base["cuda_peak_mib"]]
                               if device.type == "cuda" else [])])
                measured.append({**r, "name": name, "compared_with": base["config"], "ratio_net": net / base_net,
                                 "ratio_peak": r["peak_mib"] / base["peak_mib"]})
    headers = ["teacher", "batch", "configuration", "trainable params", "weights MiB", "grads + AdamW MiB",
               "peak - baseline MiB", "of which activations etc. MiB", "peak RSS MiB", "compared with",
               "(peak - baseline) / that", "peak / that",
               *(["CUDA peak MiB", "CUDA peak / that"] if device.type == "cuda" else [])]
    title = (f"Peak memory of self-distillation, seq {args.seq_len}, {args.steps} AdamW steps, each configuration in "
             f"a fresh process, malloc {args.malloc} (target: lora <= {TARGET_LORA}x two-model)")
    report("memory", args, device, {title: table(headers, rows)}, {"configurations": measured})


if __name__ == "__main__":
    main()
