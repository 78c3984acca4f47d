"""BitNet b1.58 quantizers: absmean ternary weights and per-token absmax int8 activations ("W1.58A8").

Two forms of each quantizer:

* ``ternary_weight`` / ``int8_activation`` return integer *codes* and the scale that maps them back
  (``w ~= w_q * scale``, ``x ~= x_q * scale``). Export and reference maths use these.
* ``ste_ternary_codes`` / ``ste_int8_codes`` return the same codes carrying a straight-through gradient,
  optionally blended with the full-precision value (the "lambda warm-up" of the Hugging Face 1.58-bit
  fine-tuning recipe: ``x + lam * (q(x) - x).detach()``).

Training multiplies codes, not dequantized values: ``(x_q @ w_q.T) * (s_x * s_w)``. The integer product is
exact in fp32 (|x_q| <= 128, |w_q| <= 1, so sums stay far below 2**24), which keeps the student's forward pass
identical to integer arithmetic while the gradients are those of the usual fake-quant STE.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

EPS = 1e-5  # keeps scales away from zero for all-zero tensors or tokens
INT8_MIN, INT8_MAX = -128, 127


def ternary_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternary quantization of a whole tensor.

    Returns ``(w_q, scale)`` with ``scale = mean(|w|)`` (a 0-d fp32 tensor, clamped to >= EPS) and
    ``w_q = clamp(round(w / scale), -1, 1)`` (fp32 values in {-1, 0, 1}).
    """
    w = w.float()
    scale = w.abs().mean().clamp(min=EPS)
    return (w / scale).round().clamp(-1, 1), scale


def int8_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dimension) absmax quantization to the int8 range [-128, 127].

    Returns ``(x_q, scale)`` with ``scale = max(|x|) / 127`` per token (shape ``[..., 1]``, fp32) and
    ``x_q = clamp(round(x * 127 / max(|x|)), -128, 127)`` (fp32 integer values). Multiplying by
    ``127 / max`` rather than dividing by ``scale`` matches transformers' BitLinear bit for bit.
    """
    x = x.float()
    absmax = x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    x_q = (x * (INT8_MAX / absmax)).round().clamp(INT8_MIN, INT8_MAX)
    return x_q, absmax / INT8_MAX


def _straight_through(x: torch.Tensor, q: torch.Tensor, lam: float) -> torch.Tensor:
    """Forward ``x + lam * (q - x)``, backward identity (gradients pass through the rounding)."""
    if lam >= 1.0:
        return x + (q - x).detach()
    if lam <= 0.0:
        return x
    return x + lam * (q - x).detach()


def ste_ternary_codes(w: torch.Tensor, lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes of ``w`` with a straight-through gradient; the scale carries no gradient.

    With ``lam == 1`` the forward value is exactly ``w_q``; with ``lam < 1`` it is the warm-up blend
    ``w/s + lam * (w_q - w/s)``, so ``codes * scale == w + lam * (q(w) - w)``.
    """
    w_q, scale = ternary_weight(w.detach())
    return _straight_through(w.float() / scale, w_q, lam), scale


def ste_int8_codes(x: torch.Tensor, lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes of ``x`` with a straight-through gradient (see ``ste_ternary_codes``)."""
    x_q, scale = int8_activation(x.detach())
    return _straight_through(x.float() / scale, x_q, lam), scale


def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype BitLinear's matmuls run in for a layer computing in ``dtype``: that dtype, except float32 for
    float16, which has the range for neither the unscaled products (integer sums up to 127 x in_features, above
    fp16's 65504 on wide layers) nor the scaled gradient ``dy * s_x * s_w`` (about 1e-3 dy: typical gradients fall
    below fp16's smallest subnormal and train nothing). bfloat16 has float32's exponent range and stays itself."""
    return torch.float32 if dtype == torch.float16 else dtype


def bitlinear_graph(x: torch.Tensor, weight: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """``bitlinear`` without bias, composed from the straight-through quantizers (autograd derives the backward).

    Handles any ``lam`` (the warm-up blend); at ``lam == 1`` ``bitlinear`` uses ``_BitLinearSTE`` instead, which
    computes the same values and gradients but saves int8 codes for backward where this graph saves fp32 copies of
    the quantized weight and activations (4x the memory, a full weight-sized tensor per layer).
    """
    w_codes, w_scale = ste_ternary_codes(weight, lam)
    x_codes, x_scale = ste_int8_codes(x, lam)
    _, mm_dtype, autocast_off = compute_dtypes(x)
    with autocast_off:
        y = F.linear(x_codes.to(mm_dtype), w_codes.to(mm_dtype))
    return (y.float() * (x_scale * w_scale)).to(x.dtype)


def compute_dtypes(x: torch.Tensor):
    """``(output dtype, matmul dtype, context for the matmul)``: under CUDA autocast the output takes autocast's dtype,
    like any autocast linear; the matmul runs in ``matmul_dtype`` of it, with autocast held off where that differs
    (float16 autocast would cast the operands back down)."""
    autocast = x.is_cuda and torch.is_autocast_enabled("cuda")
    out_dtype = torch.get_autocast_dtype("cuda") if autocast else x.dtype
    mm_dtype = matmul_dtype(out_dtype)
    off = torch.autocast("cuda", enabled=False) if autocast and mm_dtype != out_dtype else contextlib.nullcontext()
    return out_dtype, mm_dtype, off


class _BitLinearSTE(torch.autograd.Function):
    """``bitlinear_graph`` at full quantization as one autograd node.

    Forward: the same codes, matmul and scales. Backward: the straight-through gradients autograd derives from the
    graph, in the same order of operations (``g = dy * s_x * s_w`` in the matmul dtype, ``dx = (g @ w_q) / s_x``,
    ``dW = (g.T @ x_q) / s_w``), from the int8 codes saved in forward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Under CUDA autocast the matmul takes bf16 codes and, like any autocast linear, the output stays in bf16.
        out_dtype, mm_dtype, autocast_off = compute_dtypes(x)
        ctx.dtypes = mm_dtype, x.dtype, weight.dtype
        ctx.triton = _kernel(x) == "triton"
        if ctx.triton:  # the whole layer in Triton kernels (bitnet/triton_bitlinear.py), codes saved 2-D
            y, x_q, w_q, x_scale, w_scale = _triton().forward(x, weight, out_dtype)
            ctx.save_for_backward(x_q, w_q, x_scale, w_scale)
            ctx.x_shape = x.shape
            return y
        ops = _elementwise(x)
        x_mm, w_mm, x_q, w_q, x_scale, w_scale = ops.operands(x, weight, mm_dtype)
        with autocast_off:
            y = F.linear(x_mm, w_mm)
        ctx.save_for_backward(x_q, w_q, x_scale, w_scale)
        return ops.scaled(y, x_scale * w_scale, out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_q, w_q, x_scale, w_scale = ctx.saved_tensors
        mm_dtype, x_dtype, w_dtype = ctx.dtypes
        if ctx.triton:
            dx, dw = _triton().backward(dy, x_q, w_q, x_scale, w_scale, mm_dtype, x_dtype, w_dtype,
                                        *ctx.needs_input_grad[:2])
            return (dx.reshape(ctx.x_shape) if dx is not None else None), dw
        ops = _elementwise(dy)
        g = ops.scaled(dy, x_scale * w_scale, mm_dtype)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = ops.unscaled(g @ w_q.to(mm_dtype), x_scale, x_dtype)
        if ctx.needs_input_grad[1]:
            dw = g.reshape(-1, g.shape[-1]).T @ x_q.reshape(-1, x_q.shape[-1]).to(mm_dtype)
            dw = ops.unscaled(dw, w_scale, w_dtype)
        return dx, dw


# ---- the elementwise work around the matmuls, eager or fused ------------------------------------------------------

def _operands(x: torch.Tensor, weight: torch.Tensor, mm_dtype: torch.dtype):
    """Both operands' codes for the matmul (in ``mm_dtype``) and for backward (int8), and their scales."""
    w_q, w_scale = ternary_weight(weight)
    x_q, x_scale = int8_activation(x)
    return x_q.to(mm_dtype), w_q.to(mm_dtype), x_q.to(torch.int8), w_q.to(torch.int8), x_scale, w_scale


def _scaled(y: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (y.float() * scale).to(dtype)


def _unscaled(y: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (y.float() / scale).to(dtype)


class _Elementwise(NamedTuple):
    operands: Callable
    scaled: Callable
    unscaled: Callable


_EAGER = _Elementwise(_operands, _scaled, _unscaled)


@functools.cache
def _fused() -> _Elementwise:
    """The same functions compiled by ``torch.compile`` (Inductor fuses each into one or two GPU kernels).

    On a GPU the matmuls of a ternary layer are cheap and the quantizers' elementwise passes over activations and
    weights (abs, max, scale, round, clamp, casts: about ten kernels each way) cost as much again; fused, they cost
    less (docs/RESULTS.md, "On a GPU"). Integer
    codes are unchanged; the scale ``mean|W|`` is a float reduction whose summation order may differ in the last bit,
    as between CPU and CUDA.
    """
    compile = functools.partial(torch.compile, dynamic=True)
    return _Elementwise(compile(_operands), compile(_scaled), compile(_unscaled))


def fused_on_cuda() -> bool:
    """Whether CUDA tensors take the compiled path: yes unless ``BITNET_FUSED=0`` or ``BITNET_KERNEL`` names
    another. (With dynamo disabled, ``TORCHDYNAMO_DISABLE=1``, ``torch.compile`` returns the functions as they are,
    so that path runs eagerly.)"""
    return kernel_on_cuda() == "compile"


KERNELS = ("compile", "triton", "eager")


def kernel_on_cuda() -> str:
    """How ``_BitLinearSTE`` computes on CUDA tensors, from ``BITNET_KERNEL``:

    * ``compile`` (the default): eager matmuls, the quantizers and scalings compiled by ``torch.compile``;
    * ``triton``: the whole layer in Triton kernels, int8 x int8 integer matmuls (``bitnet.triton_bitlinear``;
      needs Triton). Opt-in until a GPU has measured it faster than ``compile`` (``bench/train_step.py``);
    * ``eager``: plain PyTorch, as on CPU. ``BITNET_FUSED=0`` (the older switch) means ``eager`` too.

    CPU tensors always run eagerly, except that ``triton`` with Triton's interpreter on (``TRITON_INTERPRET=1`` when
    ``bitnet.triton_bitlinear`` was first imported) runs the kernels on the CPU: that is how the tests check them.
    """
    name = os.environ.get("BITNET_KERNEL", "").strip().lower()
    if not name:
        return "eager" if os.environ.get("BITNET_FUSED", "1") == "0" else "compile"
    if name not in KERNELS:
        raise ValueError(f"BITNET_KERNEL must be one of {', '.join(KERNELS)}, got {name!r}")
    return name


def _triton():
    from . import triton_bitlinear  # optional: imports without Triton, and says how to install it when asked

    triton_bitlinear.require()
    return triton_bitlinear


def _kernel(t: torch.Tensor) -> str:
    name = kernel_on_cuda()
    if t.is_cuda:
        return name
    if name == "triton":
        from . import triton_bitlinear  # imports without Triton (INTERPRET is then False)

        return "triton" if triton_bitlinear.INTERPRET else "eager"
    return "eager"


def _elementwise(t: torch.Tensor) -> _Elementwise:
    return _fused() if _kernel(t) == "compile" else _EAGER


def bitlinear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    lam: float = 1.0,
) -> torch.Tensor:
    """``act_quant(x) @ ternary(weight).T * (s_x * s_w) (+ bias)``, trainable through the STE.

    The matmul runs in ``x.dtype`` (bf16 on GPU under autocast; fp32 for fp16, see ``matmul_dtype``); codes are
    small integers, exact in any float format, and the scales are applied afterwards in fp32. At full quantization
    (``lam == 1``) one autograd node (``_BitLinearSTE``) keeps only int8 codes for backward; on CUDA its elementwise
    work is compiled, or the whole layer runs in Triton kernels (``kernel_on_cuda``: ``BITNET_KERNEL``).
    """
    if lam == 1.0:
        y = _BitLinearSTE.apply(x, weight)
    elif not 0.0 <= lam < 1.0:
        raise ValueError(f"bitlinear: the warm-up blend lam must lie in [0, 1], got {lam}")
    else:
        y = bitlinear_graph(x, weight, lam)
    if bias is not None:
        y = y + bias
    return y
