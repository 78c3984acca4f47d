"""Linear layers of the BitNet student.

* ``BitLinear``: a trainable BitNet b1.58 layer with full-precision latent weights (the superposition
  student is built from these).
* ``DualModeLinear``: wraps a pretrained ``nn.Linear`` for self-distillation. It keeps the frozen original
  weight W (the very same tensor, not a copy) and a trainable patch dW, and runs either as the original
  layer (teacher mode, ``x @ W.T + b`` exactly) or as a BitNet layer on ``W + dW`` (student mode).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from .quant import bitlinear, compute_dtypes, int8_activation, ternary_weight

TEACHER, STUDENT = "teacher", "student"


class BitLinear(nn.Linear):
    """BitNet b1.58 linear layer: ternary weights, int8 activations, straight-through training.

    ``quant_lambda`` in [0, 1] blends the quantizers in during warm-up (1 = fully quantized).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.quant_lambda = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bitlinear(x, self.weight, self.bias, self.quant_lambda)


class FullDelta(nn.Module):
    """dW with the shape of W, zero-initialised: step 0 is plain post-training ternary quantization."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype, device=device))

    def forward(self) -> torch.Tensor:
        return self.weight


class LoRADelta(nn.Module):
    """dW = B @ A of rank r; B starts at zero so that dW = 0 at step 0 (as in LoRA)."""

    def __init__(self, out_features: int, in_features: int, rank: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's initialisation of A

    def forward(self) -> torch.Tensor:
        return self.lora_B @ self.lora_A


def parse_delta(delta: str) -> int | None:
    """``"full"`` -> None, ``"lora:R"`` -> R; anything else is a clear error."""
    if delta == "full":
        return None
    match = re.fullmatch(r"lora:(\d+)", delta)
    if match and int(match.group(1)) > 0:
        return int(match.group(1))
    raise ValueError(f"delta must be 'full' or 'lora:R' with a positive rank R (e.g. 'lora:16'), got {delta!r}")


class DualModeLinear(nn.Module):
    """One pretrained linear layer that runs as the teacher (original) or the student (BitNet on W + dW).

    ``weight`` and ``bias`` are the original module's parameters, shared (same storage) and frozen.
    """

    def __init__(self, base: nn.Linear, delta: str = "full", delta_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)
        self.bias = base.bias.requires_grad_(False) if base.bias is not None else None
        rank = parse_delta(delta)
        shape = (self.out_features, self.in_features)
        device = base.weight.device
        if rank is None:
            self.delta = FullDelta(*shape, dtype=delta_dtype, device=device)
        else:
            self.delta = LoRADelta(*shape, rank=rank, dtype=delta_dtype, device=device)
        self.mode = TEACHER
        self.quant_lambda = 1.0
        self.use_delta = True  # False: the student quantizes W alone (naive post-training quantization)

    def student_weight(self) -> torch.Tensor:
        """The latent weight the student quantizes: W + dW (in the delta's dtype, fp32 by default)."""
        if not self.use_delta:
            return self.weight
        return self.weight.to(self.delta_dtype) + self.delta()

    @property
    def delta_dtype(self) -> torch.dtype:
        return next(self.delta.parameters()).dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == TEACHER:
            return F.linear(x, self.weight, self.bias)  # exactly what nn.Linear.forward computes
        return bitlinear(x, self.student_weight(), self.bias, self.quant_lambda)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


class TernaryLinear(nn.Module):
    """Inference-only BitNet layer holding frozen ternary codes and their scale (what an export stores).

    Computes exactly what ``BitLinear`` computes at full quantization, without re-deriving the scale from
    dequantized weights (which would change it: mean(|w_q * s|) != s when some codes are zero).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_latent(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> TernaryLinear:
        """Freeze a latent full-precision weight (e.g. a trained BitLinear's) into codes and scale."""
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None)
        codes, scale = ternary_weight(weight.detach())
        layer.weight_codes.copy_(codes.to(torch.int8))
        layer.weight_scale.copy_(scale)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q, x_scale = int8_activation(x)
        _, mm_dtype, autocast_off = compute_dtypes(x)  # fp32 for fp16: its range cannot hold the integer products
        with autocast_off:
            y = F.linear(x_q.to(mm_dtype), self.weight_codes.to(mm_dtype))
        y = (y.float() * (x_scale * self.weight_scale)).to(x.dtype)
        return y + self.bias if self.bias is not None else y
