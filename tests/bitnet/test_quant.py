"""Quantizers and the BitLinear kernel against a float64 reference written out by hand."""

import pytest
import torch
import torch.nn.functional as F

from bitnet import BitLinear, TernaryLinear, bitlinear, int8_activation, ternary_weight
from bitnet.quant import bitlinear_graph

from .reference import reference_bitlinear


def test_ternary_weight_codes_and_absmean_scale():
    w = torch.randn(16, 24)
    w_q, scale = ternary_weight(w)
    assert set(w_q.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.allclose(scale, w.abs().mean())
    assert torch.equal(w_q, (w / w.abs().mean()).round().clamp(-1, 1))


def test_ternary_weight_of_zeros_is_finite():
    w_q, scale = ternary_weight(torch.zeros(4, 4))
    assert scale.item() == pytest.approx(1e-5) and torch.equal(w_q, torch.zeros(4, 4))


def test_int8_activation_is_per_token_absmax():
    x = torch.randn(3, 5, 32) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1)
    x_q, scale = int8_activation(x)
    assert scale.shape == (3, 5, 1)
    assert x_q.min() >= -128 and x_q.max() <= 127 and torch.equal(x_q, x_q.round())
    assert torch.equal(x_q.abs().amax(-1), torch.full((3, 5), 127.0))  # each token's max hits the edge
    assert torch.all((x_q * scale - x).abs() <= scale / 2 + 1e-6)


@pytest.mark.parametrize("shape", [(7, 64), (2, 5, 48)])
def test_bitlinear_matches_float64_integer_reference(shape):
    torch.manual_seed(0)
    x, w = torch.randn(*shape), torch.randn(40, shape[-1])
    ours = bitlinear(x, w)
    ref = reference_bitlinear(x, w)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)


def test_bitlinear_integer_part_is_exact_in_fp32():
    """The codes' product is computed exactly: dividing out the scales recovers integers."""
    torch.manual_seed(1)
    x, w = torch.randn(4, 256), torch.randn(8, 256)
    x_q, s_x = int8_activation(x)
    w_q, s_w = ternary_weight(w)
    y = bitlinear(x, w)
    integer = (x_q.long() @ w_q.long().T).float()
    torch.testing.assert_close(y, integer * (s_x * s_w), rtol=0, atol=0)


def test_straight_through_gradients_equal_fake_quant_gradients():
    torch.manual_seed(2)
    x = torch.randn(6, 32, requires_grad=True)
    w = torch.randn(12, 32, requires_grad=True)
    bitlinear(x, w).square().sum().backward()
    # reference: a linear layer on the dequantized tensors, gradient passed straight to x and w
    x_q, s_x = int8_activation(x.detach())
    w_q, s_w = ternary_weight(w.detach())
    xd, wd = (x_q * s_x).requires_grad_(), (w_q * s_w).requires_grad_()
    F.linear(xd, wd).square().sum().backward()
    torch.testing.assert_close(x.grad, xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, wd.grad, rtol=1e-5, atol=1e-5)


def test_lambda_warmup_blends_between_full_precision_and_quantized():
    torch.manual_seed(3)
    x, w = torch.randn(4, 32), torch.randn(8, 32)
    x_q, s_x = int8_activation(x)
    w_q, s_w = ternary_weight(w)
    torch.testing.assert_close(bitlinear(x, w, lam=0.0), F.linear(x, w), rtol=1e-5, atol=1e-5)
    half = F.linear(x + 0.5 * (x_q * s_x - x), w + 0.5 * (w_q * s_w - w))
    torch.testing.assert_close(bitlinear(x, w, lam=0.5), half, rtol=1e-5, atol=1e-5)
    for lam in (-0.1, 1.5):  # a blend outside [0, 1] would extrapolate past the quantizer
        with pytest.raises(ValueError, match="lam must lie in \\[0, 1\\]"):
            bitlinear(x, w, lam=lam)


def test_bitlinear_module_trains_latent_weights():
    torch.manual_seed(4)
    layer = BitLinear(16, 8)
    assert layer.bias is None
    x, target = torch.randn(64, 16), torch.randn(64, 8)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_bitlinear_bf16_runs_in_bf16():
    x, w = torch.randn(3, 32, dtype=torch.bfloat16), torch.randn(8, 32, dtype=torch.bfloat16)
    y = bitlinear(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference_bitlinear(x, w), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("lam", [1.0, 0.5], ids=["node", "warm-up graph"])
def test_bitlinear_fp16_neither_overflows_nor_loses_its_gradients(lam):
    """fp16 lacks the range for the unscaled integer products and the scaled gradients: the matmuls run in fp32."""
    wide = torch.ones(2, 8192, dtype=torch.float16)  # codes 127 x 1 summed over 8192 inputs: 1,040,384 > 65504
    y = bitlinear(wide, torch.ones(4, 8192, dtype=torch.float16), lam=lam)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    if lam == 1.0:
        assert torch.equal(y, torch.full_like(y, 8192))  # 1,040,384 * (1 / 127) * 1, exact
    torch.manual_seed(6)
    x16 = torch.randn(64, 256, dtype=torch.float16)
    w16 = (0.02 * torch.randn(128, 256)).half()
    upstream = 1e-4 * torch.randn(64, 128)  # dy * s_x * s_w ~ 1e-7: deep in fp16's subnormals
    grads = {}
    for dtype in (torch.float16, torch.float32):  # the same fp16 values, computed in each dtype
        x, w = x16.to(dtype).clone().requires_grad_(), w16.to(dtype).clone().requires_grad_()
        (bitlinear(x, w, lam=lam).float() * upstream).sum().backward()
        grads[dtype] = x.grad.float(), w.grad.float()
    for got, want in zip(grads[torch.float16], grads[torch.float32]):
        assert (got - want).norm() / want.norm() < 1e-2  # 0.46 when g = dy * s_x * s_w was fp16: a bit or two left


def test_frozen_ternary_layer_in_fp16_does_not_overflow():
    layer = TernaryLinear.from_latent(torch.ones(4, 8192)).half()
    y = layer(torch.ones(2, 8192, dtype=torch.float16))  # 127 x 1 summed over 8192 inputs: 1,040,384 > 65504
    assert y.dtype == torch.float16 and torch.equal(y, torch.full_like(y, 8192))


def test_fused_straight_through_matches_the_composed_graph():
    """bitlinear's fused node (int8 codes saved for backward) gives the values and gradients of the STE graph."""
    torch.manual_seed(5)
    x = torch.randn(3, 7, 32, requires_grad=True)
    w = torch.randn(12, 32, requires_grad=True)
    upstream = torch.randn(3, 7, 12)
    y = bitlinear(x, w)
    assert y.grad_fn is not None and "BitLinearSTE" in type(y.grad_fn).__name__
    (y * upstream).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = bitlinear_graph(x2, w2)
    (y2 * upstream).sum().backward()
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)
    # only the weight needs a gradient (a frozen input, as in the first block, after frozen embeddings): the same
    w.grad, w3 = None, w.detach().clone().requires_grad_()
    bitlinear(x.detach(), w).sum().backward()
    bitlinear_graph(x.detach(), w3).sum().backward()
    torch.testing.assert_close(w.grad, w3.grad, rtol=1e-5, atol=1e-5)
