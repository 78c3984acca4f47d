"""Peak memory of self-distillation: one dual-mode model vs a frozen teacher plus a separate student.

Each configuration runs in a fresh process (``--child``): build the model(s), then a few steps of the project's
self-distillation loss (``distill.train_self.self_distill_trainable``: teacher forward, student forward with CE + KL
+ hidden cosine on every layer, backward, clipping, AdamW), and report the process's peak resident set size
(``ru_maxrss``; on CUDA also ``torch.cuda.max_memory_allocated``). The two-model approach runs through the very same
loss code: ``TwoModels`` plays the ``DualModel`` role, teacher mode calling the frozen copy, student mode the
student (the teacher's architecture with every block ``nn.Linear`` a trainable ``BitLinear`` on its own copy of the
weights; the same parameters train as with ``delta=full``). Target: ``delta=lora:R`` <= 0.4x of two-model.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/memory.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from bench.common import REPO, VOCAB, compute_dtype, parser, peak_rss_mib, report, setup, stepper, table, teacher
from bitnet import BitLinear, find_block_linears, patch_model
from distill.config import load_config
from distill.rows import Rows
from distill.train_self import self_distill_trainable

TARGET_LORA = 0.4
CONFIGS = ("two-model", "dual full", "dual full, bf16 dW", "dual lora")


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


def child(args) -> dict:
    """One configuration in this (fresh) process; prints its measurements as one JSON line."""
    device = setup(args)
    # Random token ids (memory does not depend on their values): tokenizing the corpus here would raise the peak
    # before the baseline is taken.
    ids = torch.randint(4, VOCAB, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    baseline = peak_rss_mib()
    model, info = teacher(args.teacher, device, compute_dtype(device))
    if args.child == "two-model":
        trained = TwoModels(model, separate_student(model))
    else:
        delta = f"lora:{args.rank}" if args.child == "dual lora" else "full"
        delta_dtype = torch.bfloat16 if "bf16" in args.child else torch.float32
        trained = patch_model(model.train(), delta=delta, delta_dtype=delta_dtype)
    built = peak_rss_mib()
    rows = Rows(args.batch, lambda index: {"input_ids": ids[index], "attention_mask": mask[index]})
    cfg = load_config("quickstart", {"train.batch_size": args.batch})
    trainable = self_distill_trainable(trained, cfg, rows, device)
    counter = iter(range(args.steps))
    step = stepper(trainable.parameters, lambda: trainable.loss(next(counter))[0], device)
    for _ in range(args.steps):
        step()
    result = {"config": args.child, **info, "baseline_mib": baseline, "built_mib": built, "peak_mib": peak_rss_mib(),
              "trainable_parameters": sum(p.numel() for p in trainable.parameters)}
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(result))
    return result


def run_child(config: str, args) -> dict:
    command = [sys.executable, "-m", "bench.memory", "--child", config, "--teacher", args.teacher,
               "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--rank", str(args.rank),
               "--steps", str(args.steps), "--device", args.device, "--threads", str(args.threads)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--teachers", nargs="+", default=["quickstart", "large"], choices=["quickstart", "large"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank R of delta=lora:R")
    p.add_argument("--steps", type=int, default=3, help="optimiser steps per configuration (peak by step 2)")
    p.add_argument("--child", choices=CONFIGS, help="(internal) run one configuration in this process")
    p.add_argument("--teacher", default="quickstart", help="(with --child) which teacher")
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    device = setup(args)
    measured, rows = [], []
    for kind in args.teachers:
        args.teacher = kind
        results = {}
        for config in CONFIGS:
            print(f"{kind}: {config}", flush=True)
            results[config] = run_child(config, args)
        base = results["two-model"]
        for config, r in results.items():
            name = f"dual lora:{args.rank}" if config == "dual lora" else config
            net = (r["peak_mib"] - r["baseline_mib"]) / (base["peak_mib"] - base["baseline_mib"])
            rows.append([kind, r["source"], name, r["trainable_parameters"], r["baseline_mib"], r["peak_mib"],
                         r["peak_mib"] - r["baseline_mib"], r["peak_mib"] / base["peak_mib"], net,
                         *([r["cuda_peak_mib"] / base["cuda_peak_mib"]] if device.type == "cuda" else [])])
            measured.append({**r, "name": name, "ratio_peak": r["peak_mib"] / base["peak_mib"], "ratio_net": net})
    headers = ["teacher", "weights", "configuration", "trainable params", "baseline MiB", "peak RSS MiB",
               "peak - baseline MiB", "peak / two-model", "(peak - baseline) / two-model",
               *(["CUDA peak / two-model"] if device.type == "cuda" else [])]
    title = (f"Peak memory of self-distillation, batch {args.batch} x {args.seq_len}, {args.steps} AdamW steps, "
             f"each in a fresh process (target: lora <= {TARGET_LORA}x two-model)")
    report("memory", args, device, {title: table(headers, rows)}, {"configurations": measured})


if __name__ == "__main__":
    main()
