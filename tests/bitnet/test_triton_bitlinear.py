"""The Triton BitLinear (``bitnet/triton_bitlinear.py``, ``BITNET_KERNEL=triton``) against the eager quantizers and
``_BitLinearSTE``: the same integer codes, the same forward values, the same straight-through gradients.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (numpy, one program after another: hence the
small shapes). ``@triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, i.e. when ``bitnet.triton_bitlinear`` is
first imported, and Triton reads it again while a kernel runs (modules it imports lazily then are decorated too), so
it is set around that import and during each test here, and nowhere else in the suite's process. Triton's own helpers
(tl.sum, ...) are decorated when Triton is first imported: where the suite imported it earlier, the tests here skip and
``test_in_a_fresh_interpreter`` runs this file in a new process instead. With a GPU the same tests run the compiled
kernels on CUDA tensors, plus one at training-like sizes. Skipped when Triton is not installed.
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitnet import bitlinear, int8_activation, ternary_weight
from bitnet import quant

if importlib.util.find_spec("triton") is None:  # not importorskip: importing Triton now would decorate compiled
    pytest.skip("Triton is not installed (pip install 'bitnet-distill[gpu]')", allow_module_level=True)

CUDA = torch.cuda.is_available()
REPO = Path(__file__).resolve().parents[2]


def _triton_imported_for_compilation() -> bool:
    """Whether Triton was imported without its interpreter: its own jit helpers (tl.sum, tl.max, ...) are then
    decorated for compilation, and interpreted kernels calling them fail."""
    triton = sys.modules.get("triton")
    return triton is not None and type(triton.language.standard.sum).__name__ != "InterpretedFunction"


# In the whole suite, modules collected earlier import Triton (transformers' bitnet integration does, through
# torchao): then this file runs again, whole, in a fresh interpreter with TRITON_INTERPRET=1 (the last test below).
ELSEWHERE = not CUDA and _triton_imported_for_compilation()


def _import_kernels():
    if CUDA:
        return importlib.import_module("bitnet.triton_bitlinear")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = sys.modules.get("bitnet.triton_bitlinear")
        if module is not None and not module.INTERPRET:  # imported earlier in this process, compiled: redo
            return importlib.reload(module)
        return importlib.import_module("bitnet.triton_bitlinear")
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = previous


tb = None if ELSEWHERE else _import_kernels()
DEVICE = torch.device("cuda" if CUDA else "cpu")
assert ELSEWHERE or tb.INTERPRET != CUDA


@pytest.fixture(autouse=True)
def _exact_fp32(monkeypatch, request):
    """The eager fp32 reference must be true fp32 (TF32 would round its matmul inputs), and the Triton path picks
    TF32 only when PyTorch does. Without a GPU, Triton's interpreter stays on while the test runs."""
    if ELSEWHERE and request.node.originalname != "test_in_a_fresh_interpreter":
        pytest.skip("Triton was imported in this process for compilation: test_in_a_fresh_interpreter runs this")
    if tb is not None and tb.INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    monkeypatch.delenv("BITNET_FUSED", raising=False)
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(*shape, generator=_gen(seed))).to(dtype).to(DEVICE)


# ---- quantizers: integer codes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_activation_codes_and_scales_equal_the_eager_quantizer(dtype):
    x = _randn(37, 70, seed=0, dtype=dtype, scale=3.0)
    x[3] = 0  # an all-zero token: the scale is clamped to EPS / 127, the codes are 0
    # a token whose scaled values are exact ties: absmax 127 gives the multiplier reciprocal(127) * 127, which is 1.0
    # in fp32, so k + 0.5 lands on .5 and must round to even as torch.round does
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.5])
    assert torch.equal(ties.reciprocal()[0] * 127, torch.tensor(1.0))
    x[5, :10] = ties.to(dtype).to(DEVICE)
    x[5, 10:] = 0
    codes, scales = tb.quantize_activations(x)
    want_codes, want_scales = int8_activation(x)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (37, 1)
    assert torch.equal(codes.float(), want_codes)
    assert torch.equal(scales, want_scales)  # exact maxima: bit for bit
    assert codes[5, :10].tolist() == [127, 0, 2, 2, 0, -2, -2, 126, -126, 4]
    assert not codes[3].any()


def test_activation_codes_of_strided_rows():
    x = _randn(24, 80, seed=1)[:, 5:75]  # rows 80 apart, 70 wide: the kernel takes the row stride
    codes, scales = tb.quantize_activations(x)
    want_codes, want_scales = int8_activation(x)
    assert torch.equal(codes.float(), want_codes) and torch.equal(scales, want_scales)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(29, 70), (64, 300), (1, 5)], ids=["odd", "several-blocks", "tiny"])
def test_ternary_codes_equal_the_eager_quantizer(shape, dtype):
    w = _randn(*shape, seed=2, dtype=dtype, scale=0.02)
    codes, scale = tb.quantize_weight(w)
    want_codes, want_scale = ternary_weight(w)
    assert codes.dtype == torch.int8 and codes.shape == shape and scale.shape == ()
    # the scale is a float sum taken in another order: equal up to fp32 rounding (at these sizes, usually exactly);
    # the codes are identical (a weight within one rounding of a boundary could differ: none is, here)
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    assert torch.equal(codes.float(), want_codes)


def test_ternary_codes_at_the_boundaries_and_for_a_zero_weight():
    # mean |w| = 8 / 8 = 1 in any summation order, so w / scale is w: +-0.5 are ties (round to even: 0), +-1.5 -> 1
    w = torch.tensor([[0.5, -0.5, 1.5, -1.5], [0.0, 0.0, 2.0, 2.0]], device=DEVICE)
    codes, scale = tb.quantize_weight(w)
    assert scale.item() == 1.0
    assert codes.tolist() == [[0, 0, 1, -1], [0, 0, 1, 1]] == ternary_weight(w)[0].int().tolist()
    codes, scale = tb.quantize_weight(torch.zeros(3, 7, device=DEVICE))
    assert scale.item() == torch.tensor(quant.EPS).item() and not codes.any()


# ---- the layer: forward values and straight-through gradients ------------------------------------------------------

def _run(kernel, monkeypatch, x, w, upstream):
    """``bitlinear``'s output and gradients with BITNET_KERNEL=kernel."""
    monkeypatch.setenv("BITNET_KERNEL", kernel)
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = bitlinear(x, w)
    assert "BitLinearSTE" in type(y.grad_fn).__name__
    (y.float() * upstream).sum().backward()
    return y, x.grad, w.grad


def _reference(x, w, upstream, mm_dtype, s_w):
    """float64 maths on the codes and the given weight scale: the forward exactly, gradients from g rounded to the
    matmul dtype as ``_BitLinearSTE`` rounds it."""
    x_q, s_x = int8_activation(x)
    w_q = ternary_weight(w)[0]
    y = (x_q.double() @ w_q.double().T).float() * (s_x * s_w)  # the integer sum is exact in float64 and in fp32
    dy = upstream.to(x.dtype)  # the gradient reaching the node, in its output dtype
    g = (dy.float() * (s_x * s_w)).to(mm_dtype).double()
    return y, (g @ w_q.double()) / s_x, (g.reshape(-1, g.shape[-1]).T @ x_q.reshape(-1, x_q.shape[-1]).double()) / s_w


SHAPES = {  # (x shape, out features): K and N off the blocks, one token, 3-D input, exactly one block
    "odd": ((37, 70), 29),
    "one-token": ((1, 70), 29),
    "3d": ((2, 5, 33), 21),
    "block": ((16, 32), 16),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_fp32_forward_is_integer_arithmetic_and_gradients_match_eager(name, monkeypatch):
    x_shape, n = SHAPES[name]
    x, w = _randn(*x_shape, seed=3), _randn(n, x_shape[-1], seed=4, scale=0.05)
    upstream = _randn(*x_shape[:-1], n, seed=5)
    y, dx, dw = _run("triton", monkeypatch, x, w, upstream)
    y_eager, dx_eager, dw_eager = _run("eager", monkeypatch, x, w, upstream)
    assert y.dtype == dx.dtype == dw.dtype == torch.float32 and y.shape == y_eager.shape and dx.shape == x.shape
    s_w = tb.quantize_weight(w)[1]
    y_ref, dx_ref, dw_ref = _reference(x, w, upstream, torch.float32, s_w)
    # forward: the int32 sum is exact and scaled as eager scales it, y * (s_x * s_w), so with the same weight scale
    # it is bit for bit; eager's scale may differ in its last bit (a sum in another order), hence rtol 1e-6 there
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=0)
    # gradients: fp32 sums of <= 70 terms in another order than the CPU's BLAS. Each is within n * 2**-24 of the sum
    # of the terms' magnitudes (at most 70 * 6e-8 ~ 4e-6 relative to the largest gradient), so 1e-5 of the largest
    # gradient bounds the difference where terms cancel, and 1e-5 relative elsewhere
    for got, ref, eager in ((dx, dx_ref, dx_eager), (dw, dw_ref, dw_eager)):
        tol = 1e-5 * ref.abs().max().item()
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=tol)
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=tol)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=["fp32-weight", "bf16-weight"])
def test_bf16_forward_is_rounded_once_and_gradients_match_eager(w_dtype, monkeypatch):
    """bf16 activations (and the fp32 latent weight of ``DualModeLinear`` or a bf16 one): output and dx in bf16,
    dW in the weight's dtype, the backward matmuls in bf16."""
    x, w = _randn(3, 7, 70, seed=6, dtype=torch.bfloat16), _randn(29, 70, seed=7, dtype=w_dtype, scale=0.05)
    upstream = _randn(3, 7, 29, seed=8).to(torch.bfloat16).float()  # what a bf16 dy holds
    y, dx, dw = _run("triton", monkeypatch, x, w, upstream)
    y_eager, dx_eager, dw_eager = _run("eager", monkeypatch, x, w, upstream)
    assert y.dtype == dx.dtype == torch.bfloat16 and dw.dtype == w_dtype
    y_ref, dx_ref, dw_ref = _reference(x, w, upstream, torch.bfloat16, tb.quantize_weight(w)[1])
    # forward: the exact fp32 result, rounded to bf16 once
    assert torch.equal(y, y_ref.to(torch.bfloat16))
    # eager rounds twice, the integer sum to bf16 in its bf16 matmul and then the scaled value, each within 2**-8
    # relative (bf16's unit roundoff); ours once: they differ by at most three of those
    torch.testing.assert_close(y.float(), y_eager.float(), rtol=3 * 2**-8, atol=0)
    # gradients: fp32 accumulation (~1e-6 relative) then one rounding to bf16: within 2**-8 of the float64 maths,
    # 2**-7 allowing for the accumulation tipping a rounding; eager's bf16 matmul rounds once more before the
    # division, so within three roundings of ours. atol: the fp32 sums' error where terms cancel (see the fp32 test)
    for got, ref, eager in ((dx, dx_ref, dx_eager), (dw, dw_ref, dw_eager)):
        tol = 1e-5 * ref.abs().max().item()
        torch.testing.assert_close(got.double(), ref, rtol=2**-7, atol=tol)
        torch.testing.assert_close(got.float(), eager.float(), rtol=3 * 2**-8, atol=2 * tol)


def test_dw_token_chunks_add_up_to_the_single_pass(monkeypatch):
    """dW sums over tokens in chunks (to fill the GPU); the chunks' fp32 partial sums, added in order, equal the
    one-chunk sum up to fp32 rounding."""
    x, w = _randn(40, 48, seed=9), _randn(24, 48, seed=10, scale=0.05)
    dy = _randn(40, 24, seed=11)
    _, x_q, w_q, s_x, s_w = tb.forward(x, w, torch.float32)
    args = (dy, x_q, w_q, s_x, s_w, torch.float32, torch.float32, torch.float32, False, True)
    whole = tb.backward(*args, split=1)[1]
    for split in (2, 3):
        chunked = tb.backward(*args, split=split)[1]
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())
    assert tb.backward(*args[:-2], True, False)[1] is None


@pytest.mark.parametrize("needs", ["weight", "input"])
def test_only_the_gradients_asked_for(needs, monkeypatch):
    """A frozen input (the first layer's embeddings can be) or a frozen weight: backward computes only the other."""
    monkeypatch.setenv("BITNET_KERNEL", "triton")
    x, w = _randn(6, 40, seed=12), _randn(16, 40, seed=13, scale=0.05)
    (w if needs == "weight" else x).requires_grad_()
    bitlinear(x, w).sum().backward()
    assert (w.grad is not None) == (needs == "weight") and (x.grad is not None) == (needs == "input")


# ---- selection ----------------------------------------------------------------------------------------------------

def test_kernel_selection(monkeypatch):
    monkeypatch.delenv("BITNET_KERNEL", raising=False)
    assert quant.kernel_on_cuda() == "compile" and quant.fused_on_cuda()
    monkeypatch.setenv("BITNET_FUSED", "0")
    assert quant.kernel_on_cuda() == "eager" and not quant.fused_on_cuda()
    monkeypatch.setenv("BITNET_KERNEL", "triton")
    assert quant.kernel_on_cuda() == "triton" and not quant.fused_on_cuda()
    cpu = torch.zeros(1)
    assert quant._kernel(cpu) == ("triton" if tb.INTERPRET else "eager")  # CPU: only under the interpreter
    monkeypatch.setenv("BITNET_KERNEL", "cuda-graphs")
    with pytest.raises(ValueError, match="BITNET_KERNEL must be one of compile, triton, eager"):
        quant.kernel_on_cuda()


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tb, "AVAILABLE", False)
    monkeypatch.setenv("BITNET_KERNEL", "triton")
    with pytest.raises(ImportError, match=r"needs Triton.*pip install 'bitnet-distill\[gpu\]'"):
        bitlinear(torch.zeros(2, 16, device=DEVICE), torch.zeros(4, 16, device=DEVICE))


# ---- the compiled kernels ------------------------------------------------------------------------------------------

def test_kernels_compile_for_hopper_with_tensor_core_products():
    """The interpreter runs the kernels' Python; this compiles them for an H100 (sm_90), in a fresh interpreter
    without TRITON_INTERPRET, with the ptxas Triton ships: no GPU needed. The three matmuls must lower to tensor-core
    instructions (int8 forward, bf16 backward) and fit the H100's shared memory (smallest tiles of each; ``python -m
    tests.bitnet.triton_compile_check 90 --all-configs`` checks every config)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-m", "tests.bitnet.triton_compile_check", "90"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and rows and all(r["ok"] for r in rows), run.stdout + run.stderr[-3000:]
    assert {r["kernel"]: r["mma"] for r in rows if r["mma"]} == {
        "forward": "wgmma", "dx": "wgmma", "dw": "wgmma", "dw partial": "wgmma"}


# ---- GPU only -----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (training-sized tiles; the interpreter would take minutes)")
def test_training_sized_layer_under_bf16_autocast_matches_eager(monkeypatch):
    """Sizes where the autotuned tiles, several K and N blocks and the chunked dW all come into play, under bf16
    autocast as training runs (fp32 weight and input, bf16 output and matmuls)."""
    x, w = _randn(4, 512, 688, seed=14), _randn(256, 688, seed=15, scale=0.02)
    upstream = _randn(4, 512, 256, seed=16).to(torch.bfloat16).float()
    results = {}
    for kernel in ("triton", "eager"):
        monkeypatch.setenv("BITNET_KERNEL", kernel)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = bitlinear(xg, wg)
        (y.float() * upstream).sum().backward()
        results[kernel] = y, xg.grad, wg.grad
    (y, dx, dw), (y_eager, dx_eager, dw_eager) = results["triton"], results["eager"]
    assert y.dtype == torch.bfloat16 and dx.dtype == dw.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_eager.float(), rtol=2**-8, atol=0)
    for got, eager in ((dx, dx_eager), (dw, dw_eager)):
        assert (got - eager).norm() <= 1e-2 * eager.norm()


@pytest.mark.skipif(not ELSEWHERE, reason="this process runs the tests itself")
def test_in_a_fresh_interpreter():
    """This file's tests, in a process where Triton's interpreter is on from the start."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-6000:] + run.stderr[-3000:]
