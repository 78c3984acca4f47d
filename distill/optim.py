"""The optimiser of every training stage: AdamW, or torchao's 8-bit AdamW (``train.optimizer``)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import warnings

import torch
from torch import nn

from .config import ConfigError, OptimConfig


def check_optimizer(optim: OptimConfig, device: torch.device | None = None, field: str = "train.optimizer") -> None:
    """Fail before any work if the optimiser cannot run: torchao missing, or (on ``device`` CPU) no C++ compiler for
    the step torchao compiles."""
    if optim.optimizer != "adamw8bit":
        return
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"{field} 'adamw8bit' needs torchao: pip install 'bitnet-distill[optim8bit]', or set "
                          f"{field}: adamw")
    compiler = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")  # what torch's inductor runs
    eager = os.environ.get("TORCHDYNAMO_DISABLE") == "1"
    if device is not None and device.type == "cpu" and not eager and shutil.which(compiler) is None:
        raise ConfigError(f"{field} 'adamw8bit' compiles its step with torch.compile, which on CPU needs a C++ "
                          f"compiler, and {compiler} was not found: install one (or set CXX), run with "
                          f"TORCHDYNAMO_DISABLE=1 to step eagerly (slower), or set {field}: adamw")


def make_optimizer(parameters: list[nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW, or torchao's AdamW8bit: the same update with both moments quantized to 8 bits in blocks of 256
    (tensors under 4096 elements keep fp32 moments), a quarter of AdamW's state. betas and eps are torch's defaults
    in both. AdamW8bit keeps its learning rate as a tensor and compiles its step with ``torch.compile`` (a C++
    compiler on CPU; ``TORCHDYNAMO_DISABLE=1`` runs it eagerly)."""
    if optim.optimizer == "adamw8bit":
        check_optimizer(optim, parameters[0].device if parameters else None)
        return _adamw8bit()(parameters, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay)


def quiet_torchao_logs() -> None:
    """At import torchao logs that its C++/CUDA kernels do not fit this torch build, and torch that torchao registers
    types in a deprecated way; transformers imports torchao on every ``from_pretrained`` once it is installed. This
    tool uses only torchao's optimiser, which needs none of those kernels: keep the lines out of every run's log."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _adamw8bit():
    quiet_torchao_logs()
    from torchao.optim import AdamW8bit

    # torch asks tensor subclasses for a hash to cache compiled graphs across processes; torchao's state has none
    warnings.filterwarnings("ignore", message="OptimState8bit does not implement _stable_hash_for_caching")
    return AdamW8bit
