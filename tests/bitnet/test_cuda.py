"""The model core on CUDA: the paths a GPU user runs (bf16 weights, bf16 autocast), checked against the CPU.

Skipped without a GPU (CI has none); run on a GPU machine with ``pytest tests/bitnet/test_cuda.py``.
"""

import pytest
import torch
import transformers as tf

from bitnet import (
    Decompressor,
    SuperpositionStudent,
    bitlinear,
    hidden_cosine_loss,
    int8_activation,
    kl_to_teacher,
    patch_model,
    save_ternary_pretrained,
    ternary_weight,
)
from bitnet.quant import bitlinear_graph

from .reference import reference_bitlinear
from .tiny_models import tiny_causal_lm, token_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 would round the fp32 matmul's inputs; the exactness claims are for true fp32 (PyTorch's default)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_teacher_mode_is_bit_exact_on_cuda(family, dtype, tmp_path):
    model = tiny_causal_lm(family, tmp_path, dtype).to(CUDA)
    ids = token_batch().to(CUDA)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_hidden_states=True)
    dual = patch_model(model)
    assert all(layer.delta.weight.device.type == "cuda" for layer in dual.layers.values())
    with torch.no_grad(), dual.teacher():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    assert torch.equal(out.logits, ref.logits)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert torch.equal(ours, theirs)


def test_bitlinear_fp32_on_cuda_is_integer_arithmetic():
    torch.manual_seed(0)
    x, w = torch.randn(5, 9, 256, device=CUDA), torch.randn(48, 256, device=CUDA)
    x_q, s_x = int8_activation(x)
    w_q, s_w = ternary_weight(w)
    integer = (x_q.double() @ w_q.double().T).float()  # exact: |sum| <= 128 * 256 << 2**24
    torch.testing.assert_close(bitlinear(x, w), integer * (s_x * s_w), rtol=0, atol=0)
    # The integer part is exact on any device; the scale mean(|W|) is a float reduction whose order differs
    # between CUDA and CPU, so results agree with the CPU and the float64 reference to fp32 rounding only.
    torch.testing.assert_close(bitlinear(x, w).double().cpu(), reference_bitlinear(x.cpu(), w.cpu()),
                               rtol=1e-6, atol=1e-6)


def test_fused_straight_through_matches_the_graph_under_bf16_autocast():
    torch.manual_seed(1)
    x = torch.randn(4, 16, 64, device=CUDA, requires_grad=True)
    w = torch.randn(32, 64, device=CUDA, requires_grad=True)
    upstream = torch.randn(4, 16, 32, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = bitlinear(x, w)
    assert y.dtype == torch.bfloat16 and "BitLinearSTE" in type(y.grad_fn).__name__  # as autocast's F.linear
    (y * upstream).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y2 = bitlinear_graph(x2, w2)
    (y2.to(torch.bfloat16) * upstream).sum().backward()  # the graph keeps x's dtype; round it as the node does
    torch.testing.assert_close(y, y2.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)
    # bf16 products of exact integer codes: within bf16 rounding of the fp32 result
    torch.testing.assert_close(y.float(), bitlinear(x.detach(), w.detach()), rtol=1e-2, atol=5e-2)


@pytest.mark.parametrize("lam", [1.0, 0.5], ids=["node", "warm-up graph"])
def test_fp16_autocast_runs_the_matmuls_in_fp32(lam):
    """Under fp16 autocast the output is fp16, like autocast's F.linear, but the matmuls must not be: fp16 has the
    range for neither the unscaled integer products nor the scaled gradients (``bitnet.quant.matmul_dtype``)."""
    wide = torch.ones(2, 8192, device=CUDA)  # codes 127 x 1 over 8192 inputs: 1,040,384 > fp16's 65504
    with torch.autocast("cuda", dtype=torch.float16):
        y = bitlinear(wide, torch.ones(4, 8192, device=CUDA), lam=lam)
    assert torch.isfinite(y).all() and (lam < 1.0 or torch.equal(y.float(), torch.full_like(y.float(), 8192)))
    torch.manual_seed(6)
    x = torch.randn(64, 256, device=CUDA, requires_grad=True)
    w = (0.02 * torch.randn(128, 256, device=CUDA)).requires_grad_()
    upstream = 1e-4 * torch.randn(64, 128, device=CUDA)  # dy * s_x * s_w ~ 1e-7: deep in fp16's subnormals
    with torch.autocast("cuda", dtype=torch.float16):
        (bitlinear(x, w, lam=lam).float() * upstream).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (bitlinear(x2, w2, lam=lam) * upstream).sum().backward()  # fp32 throughout
    for got, want in ((x.grad, x2.grad), (w.grad, w2.grad)):
        assert (got - want).norm() / want.norm() < 1e-2


@pytest.mark.parametrize("delta", ["full", "lora:8"])
def test_self_distillation_steps_on_bf16_teacher_under_autocast(tmp_path, delta):
    """What the pipeline runs on a GPU: a bf16 teacher, fp32 dW, the student step under bf16 autocast."""
    torch.manual_seed(0)
    dual = patch_model(tiny_causal_lm("llama", tmp_path, torch.bfloat16).to(CUDA), delta=delta)
    assert all(p.dtype == torch.float32 and p.is_cuda for p in dual.trainable_parameters())
    ids = token_batch(batch=4, seq=16, seed=5).to(CUDA)
    with torch.no_grad(), dual.teacher():
        teacher = dual(ids, output_hidden_states=True)

    def loss():
        with dual.student(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = dual(ids, output_hidden_states=True)
            student_hidden = out.hidden_states[1:]
            teacher_hidden = [t.to(s.dtype) for s, t in zip(student_hidden, teacher.hidden_states[1:])]
            return kl_to_teacher(out.logits, teacher.logits.to(out.logits.dtype)) + hidden_cosine_loss(
                student_hidden, teacher_hidden)

    opt = torch.optim.AdamW(dual.trainable_parameters(), lr=5e-3, weight_decay=0.0)
    with torch.no_grad():
        start = loss().item()
    for _ in range(15):
        value = loss()
        opt.zero_grad()
        value.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dual.trainable_parameters())
        opt.step()
    with torch.no_grad():
        end = loss().item()
    assert end < 0.8 * start, (start, end)


def test_activation_checkpointing_keeps_the_gradients_under_autocast(tmp_path):
    dual = patch_model(tiny_causal_lm("llama", tmp_path, torch.bfloat16).to(CUDA))
    ids = token_batch(batch=4, seq=16, seed=5).to(CUDA)
    with torch.no_grad(), dual.teacher():
        target = dual(ids, use_cache=False).logits

    def grads():
        with dual.student(), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = kl_to_teacher(dual(ids, use_cache=False).logits, target.float())
        loss.backward()  # outside the student context, as the training loop does
        out = [p.grad.clone() for p in dual.trainable_parameters()]
        dual.model.zero_grad(set_to_none=True)
        return out

    plain = grads()
    dual.enable_activation_checkpointing()
    # the replay runs the same kernels on the same inputs; attention's backward may accumulate in another order
    # from run to run on a GPU, so equal up to that rather than bit for bit (which the CPU test checks)
    for a, b in zip(plain, grads()):
        assert (a - b).norm() <= 1e-3 * a.norm() and a.norm() > 0


def test_export_from_cuda_loads_in_stock_transformers_on_cuda(tmp_path):
    dual = patch_model(tiny_causal_lm("llama", tmp_path, torch.bfloat16).to(CUDA))
    torch.manual_seed(7)
    for p in dual.trainable_parameters():
        torch.nn.init.normal_(p, std=0.02)
    ids = token_batch(batch=3, seq=10).to(CUDA)
    with torch.no_grad(), dual.student():
        ours = dual(ids).logits
    save_ternary_pretrained(dual, tmp_path / "export")
    stock = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "export", device_map="cuda").eval()
    assert stock.dtype == torch.bfloat16 and stock.device.type == "cuda"
    with torch.no_grad():
        theirs = stock(ids).logits
    torch.testing.assert_close(theirs.float(), ours.float(), rtol=0.0, atol=2e-2)  # the bf16 tolerance of the CPU test


def test_superposition_student_trains_under_autocast_and_generates():
    torch.manual_seed(0)
    student = SuperpositionStudent(vocab_size=64, dim=32, n_layers=2, n_heads=4).to(CUDA)
    projector = Decompressor(32, 48).to(CUDA)
    ids = torch.randint(0, 64, (4, 12), device=CUDA)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    target = torch.randn(4, 12, 48, device=CUDA)
    opt = torch.optim.AdamW([*student.parameters(), *projector.parameters()], lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            predicted = projector(student(ids, attention_mask=mask).last_hidden)
            loss = hidden_cosine_loss([predicted], [target.to(predicted.dtype)], mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    out = student.eval().generate(ids[:, :3], 5, temperature=0)
    assert out.shape == (4, 8) and out.is_cuda


@pytest.fixture
def compiled_quantizers(monkeypatch):
    """``bitnet.quant._fused`` really compiled: the suite disables dynamo (tests/conftest.py), and then
    ``torch.compile`` hands back the eager functions, so the comparison below would be eager against eager."""
    from bitnet import quant

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # read by torch.compile when it is called
    quant._fused.cache_clear()
    assert quant._fused().operands is not quant._operands, "torch.compile returned the eager function"
    yield quant
    quant._fused.cache_clear()  # later tests build their own, under the suite's setting


def test_fused_elementwise_kernels_match_eager(compiled_quantizers, monkeypatch):
    """On CUDA the quantizers and scalings run compiled (``bitnet.quant._fused``): the same codes and values."""
    quant = compiled_quantizers
    torch.manual_seed(2)
    x, w = torch.randn(3, 40, 688, device=CUDA), torch.randn(256, 688, device=CUDA)
    for dtype in (torch.float32, torch.bfloat16):
        eager, fused = quant._EAGER.operands(x, w, dtype), quant._fused().operands(x, w, dtype)
        for a, b in zip(eager, fused, strict=True):  # codes must be identical; scales to the last bit or so
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)

    def step():
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = bitlinear(xg, wg)
        y.float().square().mean().backward()
        return y, xg.grad, wg.grad

    fused_results = step()
    monkeypatch.setenv("BITNET_FUSED", "0")
    for a, b in zip(fused_results, step(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
