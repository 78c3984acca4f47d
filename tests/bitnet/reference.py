"""BitNet b1.58's W1.58A8 linear layer written out by the book, independent of ``bitnet/``: the reference the
quantizers, the kernel and the student at step 0 are checked against."""

import torch


def reference_bitlinear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """W1.58A8 by the book, in float64 with an integer matmul."""
    x64, w64 = x.double(), w.double()
    s_w = w64.abs().mean().clamp(min=1e-5)
    w_q = (w64 / s_w).round().clamp(-1, 1).long()
    absmax = x64.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    x_q = (x64 * 127 / absmax).round().clamp(-128, 127).long()
    return (x_q @ w_q.T).double() * (absmax / 127) * s_w
