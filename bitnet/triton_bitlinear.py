"""BitLinear's forward and backward as Triton kernels: int8 activations x ternary int8 weights on integer tensor cores.

Opt-in on CUDA with ``BITNET_KERNEL=triton`` (``bitnet.quant.kernel_on_cuda``); ``bitnet.quant._BitLinearSTE`` calls
``forward`` and ``backward`` here. Triton is an optional dependency (``pip install 'bitnet-distill[gpu]'``; CUDA
builds of torch bring it): without it this module still imports, ``AVAILABLE`` is False and ``require()`` raises.

What runs, per layer and step (nn.Linear runs one matmul forward and two backward):

* forward: activation codes and scales (one pass over x), the weight's absmean (two small kernels: partial sums,
  then codes), and one int8 x int8 -> int32 matmul whose epilogue applies ``s_x * s_w`` in fp32 and casts;
* backward: ``dx = (g @ w_q) / s_x`` and ``dW = (g.T @ x_q) / s_w`` with ``g = dy * s_x * s_w``, each one Triton
  matmul. Both compute ``g`` while loading ``dy`` and widen the saved int8 codes while loading them, so that neither
  ``g`` nor a float copy of the codes ever reaches memory; with torch matmuls each would be a tensor written and read
  again (x_q is the size of the activations), plus a kernel launch each, and the division by the scale a further
  pass over dx and dW. torch's matmuls take operands of one dtype, so the codes would need that float copy first.

Numerics, the same as the eager ``_BitLinearSTE``:

* codes are identical given the scales: the kernels repeat the eager operations in fp32 one for one, with IEEE
  division (``tl.math.div_rn``: Triton's ``/`` on fp32 is an approximate ``div.full.f32`` on NVIDIA GPUs) and
  round-half-to-even built from ``floor`` (libdevice's ``rint`` does not run in Triton's interpreter). The per-token
  scales are exact maxima, so they agree bit for bit; the weight scale ``mean|W|`` is a float sum in another order,
  so it may differ in the last bit (as between CPU and CUDA eager), and a weight within that bit of a rounding
  boundary could then take the other code.
* the forward product is exact integer arithmetic (int32 accumulation), scaled in the eager order
  ``y * (s_x * s_w)``: in fp32 it equals the eager fp32 result; in bf16 it is the fp32 result rounded once, where
  the eager bf16 matmul rounds the integer sum to bf16 before scaling (so eager bf16 may differ by a bf16 rounding).
* backward: ``g`` is rounded to the matmul dtype as in eager; the matmuls accumulate in fp32 in their own order,
  and the fp32 sums are divided by the scale before the single rounding to the gradient's dtype.

fp32 matmul operands (fp32 training, or fp16 autocast whose backward runs in fp32: ``bitnet.quant.matmul_dtype``)
use TF32 exactly when PyTorch's fp32 matmuls do (``torch.backends.cuda.matmul.allow_tf32``, off by default).

Autotuning: the configs are sized for an H100 (and run on any GPU Triton supports); each kernel compiles its configs
and times them once per shape key (the token count rounded up to a power of two, N, K), so the first training step
of a new shape is slow; Triton keeps the compiled kernels and the choices on disk for later processes.

Without a GPU: under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors with one small config each (the tests).
It must be set when this module is imported (``@triton.jit`` reads it) and while the kernels run (Triton reads it
again then). The interpreter multiplies bfloat16 operands of ``tl.dot`` as raw bits, so there the bf16 matmul
operands are widened to fp32 first (``UPCAST``: the same exact products), and the tests check the bf16 arithmetic
but not its lowering to tensor cores; ``tests/bitnet/triton_compile_check.py`` compiles the kernels for sm_90 (or
sm_80) without a GPU, and on a GPU the same tests run the compiled kernels.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .quant import EPS

try:
    import triton
    import triton.language as tl
    import triton.testing
except ImportError:  # optional: the package works without it (eager or compiled quantizers)
    triton = tl = None

AVAILABLE = triton is not None
INSTALL = "pip install 'bitnet-distill[gpu]' (Triton; CUDA builds of torch on Linux already include it)"
# Triton reads TRITON_INTERPRET when @triton.jit decorates a function, i.e. when this module is imported.
INTERPRET = AVAILABLE and bool(triton.knobs.runtime.interpret)


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def require() -> None:
    if not AVAILABLE:
        raise ImportError(f"BITNET_KERNEL=triton needs Triton, which is not installed: {INSTALL}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if AVAILABLE:
    _TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

    def _configs(gpu: list[tuple], interpreter: tuple, names: tuple[str, ...]) -> list:
        """Autotune configs: ``gpu`` rows (block sizes..., stages, warps) on a GPU; the interpreter gets one small
        config (several would make the autotuner time each on the CPU)."""
        rows = [interpreter] if INTERPRET else gpu
        return [triton.Config(dict(zip(names, row[:-2])), num_stages=row[-2], num_warps=row[-1]) for row in rows]

    # int8 operands: K blocks of 128 bytes; the larger tiles feed Hopper's wgmma, the smaller ones keep every SM busy
    # on the narrow layers of small models. Few configs: each costs a compilation (1-5 s) and a timing on first use.
    _FWD_CONFIGS = _configs(
        [(128, 256, 128, 8, 3, 8), (128, 128, 128, 8, 4, 8), (128, 128, 64, 8, 4, 4), (64, 128, 128, 8, 4, 4),
         (64, 64, 128, 8, 4, 4)],
        (16, 16, 32, 2, 1, 1), ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"))
    # bf16 (or fp32) operands: the usual 16-bit GEMM tiles.
    _DX_CONFIGS = _configs(
        [(128, 256, 64, 8, 3, 8), (128, 128, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4),
         (64, 64, 64, 8, 4, 4)],
        (16, 16, 16, 2, 1, 1), ("BLOCK_M", "BLOCK_K", "BLOCK_N", "GROUP_M"))
    _DW_CONFIGS = _configs(
        [(128, 128, 64, 8, 3, 8), (128, 128, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4),
         (64, 64, 64, 8, 4, 4)],
        (16, 16, 16, 2, 1, 1), ("BLOCK_N", "BLOCK_K", "BLOCK_M", "GROUP_M"))

    def _bench(kernel_call, quantiles):
        """Autotuning's timing: shorter than Triton's default (25 ms warm-up, 100 ms of runs per config), enough to
        rank tiles of kernels that take tens of microseconds."""
        return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)

    def _prune(dims: dict[str, str]):
        """Drop configs whose tiles overshoot a small problem (``dims``: block name -> size argument): each one
        costs a compilation and a timing at the first call; a narrow layer or a short batch is tuned among the
        tiles that fit it."""

        def prune(configs, named_args, **kwargs):
            def fits(c):
                return all(c.kwargs[b] <= max(16, _next_pow2(named_args[d])) for b, d in dims.items())

            kept = [c for c in configs if fits(c)]
            return kept or [min(configs, key=lambda c: [c.kwargs[b] for b in dims])]

        return {"early_config_prune": prune}

    # dW splits the token dimension into chunks of a multiple of every config's BLOCK_M (see _dw_split).
    _SPLIT_ALIGN = 16 if INTERPRET else 128
    _ACT_BLOCK = 16 if INTERPRET else 4096  # elements per activation-quantization program (rows x columns)
    _W_BLOCK = 64 if INTERPRET else 2048    # elements per weight program
    _W_PARTS = 4 if INTERPRET else 512      # programs (partial sums) of the weight's absolute sum

    @triton.jit
    def _round_half_even(v):
        """``torch.round`` (ties to even) of fp32 values, exactly: ``v - floor(v)`` is exact for |v| < 2**23."""
        f = tl.floor(v)
        d = v - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)

    @triton.jit
    def _cast(v, DTYPE: tl.constexpr):
        """fp32 ``v`` in DTYPE, rounded to nearest even. bfloat16 by hand, the way torch's CPU code rounds it (bias
        0x7FFF plus the lowest kept bit; NaN stays NaN): for every other value what the GPU's conversion instruction
        gives, and right in Triton's interpreter too, whose fp32 -> bf16 cast truncates."""
        if DTYPE == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            bits = tl.where(v != v, 0x7FC0, bits)
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return v.to(DTYPE)

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """``acc + a @ b`` in fp32. UPCAST (the interpreter, whose tl.dot multiplies bfloat16 bit patterns): on exact
        fp32 copies of the operands, the same products (bf16 x bf16 is exact in fp32)."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _grouped(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """Program ``pid``'s tile, ordered in groups of GROUP_M row tiles so that neighbours share operand tiles in
        L2 (the ordering of Triton's matmul tutorial)."""
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % width) % size_m, (pid % width) // size_m

    @triton.jit
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, eps,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """Per-token absmax int8 codes and scales of BLOCK_M rows: ``bitnet.quant.int8_activation`` op for op."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
        q_rows = q_ptr + rows.to(tl.int64)[:, None] * K
        cols = tl.arange(0, BLOCK_K)
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = row_ok[:, None] & (k0 + cols < K)[None, :]
            x = tl.load(x_rows + k0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        amax = tl.maximum(amax, eps)
        inv = tl.math.div_rn(1.0, amax) * 127.0  # torch evaluates ``127 / t`` as ``t.reciprocal() * 127``
        tl.store(s_ptr + rows, tl.math.div_rn(amax, 127.0), mask=row_ok)
        for k0 in range(0, K, BLOCK_K):  # the row again: from L1/L2 when it fits, as it does for model widths
            mask = row_ok[:, None] & (k0 + cols < K)[None, :]
            x = tl.load(x_rows + k0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(_round_half_even(x * inv[:, None]), -128.0), 127.0)
            tl.store(q_rows + k0 + cols[None, :], q.to(tl.int8), mask=mask)

    @triton.jit
    def _abs_sum_kernel(w_ptr, part_ptr, numel, ITERS, BLOCK: tl.constexpr):
        """Partial sums of |w|: program p adds blocks p, p + P, p + 2P, ... (a fixed order: deterministic)."""
        pid = tl.program_id(0)
        parts = tl.num_programs(0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, ITERS):
            offs = (i * parts + pid).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            acc += tl.abs(tl.load(w_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32))
        tl.store(part_ptr + pid, tl.sum(acc, axis=0))

    @triton.jit
    def _ternary_kernel(w_ptr, part_ptr, q_ptr, s_ptr, numel, numel_f, n_parts, eps,
                        BLOCK: tl.constexpr, PARTS: tl.constexpr):
        """Absmean ternary codes: every program sums the same partials in the same order, so all agree on the scale
        ``max(sum|w| / numel, eps)`` (``bitnet.quant.ternary_weight``) without another launch."""
        p = tl.arange(0, PARTS)
        total = tl.sum(tl.load(part_ptr + p, mask=p < n_parts, other=0.0), axis=0)
        scale = tl.maximum(tl.math.div_rn(total, numel_f), eps)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        v = tl.math.div_rn(tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32), scale)
        # clamp(round(v), -1, 1): round-half-even sends exactly +-0.5 to 0, anything beyond to +-1 or further
        q = (v > 0.5).to(tl.int8) - (v < -0.5).to(tl.int8)
        tl.store(q_ptr + offs, q, mask=mask)
        tl.store(s_ptr, scale, mask=tl.program_id(0) == 0)

    @triton.autotune(configs=_FWD_CONFIGS, key=["M_KEY", "N", "K"], do_bench=_bench, cache_results=True,
                     prune_configs_by=_prune({"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K"}))
    @triton.jit
    def _fwd_kernel(xq_ptr, wq_ptr, sx_ptr, sw_ptr, y_ptr, M, N, K, M_KEY,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """``y = (x_q @ w_q.T) * (s_x * s_w)``: int8 x int8 -> int32 (exact), scaled in fp32, cast once."""
        pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        # rows past M or N wrap onto valid ones (the tutorial's trick: unmasked loads), and are not stored
        a_ptrs = xq_ptr + (rm % M).to(tl.int64)[:, None] * K + rk[None, :]
        b_ptrs = wq_ptr + (rn % N).to(tl.int64)[None, :] * K + rk[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs, mask=(k0 + rk < K)[None, :], other=0)
            b = tl.load(b_ptrs, mask=(k0 + rk < K)[:, None], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        s = tl.load(sx_ptr + rm, mask=rm < M, other=0.0) * tl.load(sw_ptr)
        y = acc.to(tl.float32) * s[:, None]
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        tl.store(y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], _cast(y, y_ptr.dtype.element_ty), mask=mask)

    @triton.autotune(configs=_DX_CONFIGS, key=["M_KEY", "N", "K", "MM_DTYPE", "PRECISION"], do_bench=_bench,
                     cache_results=True, prune_configs_by=_prune({"BLOCK_M": "M", "BLOCK_K": "K", "BLOCK_N": "N"}))
    @triton.jit
    def _dx_kernel(dy_ptr, wq_ptr, sx_ptr, sw_ptr, dx_ptr, M, N, K, M_KEY,
                   MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """``dx = (g @ w_q) / s_x`` with ``g = (dy * (s_x * s_w))`` in MM_DTYPE, over N in BLOCK_N steps."""
        pid_m, pid_k = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rn = tl.arange(0, BLOCK_N)
        sx = tl.load(sx_ptr + rm % M)
        s = sx * tl.load(sw_ptr)
        dy_ptrs = dy_ptr + (rm % M).to(tl.int64)[:, None] * N + rn[None, :]
        w_ptrs = wq_ptr + rn.to(tl.int64)[:, None] * K + (rk % K)[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            dy = tl.load(dy_ptrs, mask=(n0 + rn < N)[None, :], other=0.0)
            g = _cast(dy.to(tl.float32) * s[:, None], MM_DTYPE)
            # codes via fp32: exact in any float type (the interpreter's int8 -> bf16 cast is not a conversion)
            w = tl.load(w_ptrs, mask=(n0 + rn < N)[:, None], other=0).to(tl.float32).to(MM_DTYPE)
            acc = _dot(g, w, acc, PRECISION, UPCAST)
            dy_ptrs += BLOCK_N
            w_ptrs += BLOCK_N * K
        dx = tl.math.div_rn(acc, sx[:, None])
        mask = (rm < M)[:, None] & (rk < K)[None, :]
        tl.store(dx_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], _cast(dx, dx_ptr.dtype.element_ty), mask=mask)

    @triton.autotune(configs=_DW_CONFIGS, key=["M_KEY", "N", "K", "PARTIAL", "MM_DTYPE", "PRECISION"],
                     do_bench=_bench, cache_results=True,
                     prune_configs_by=_prune({"BLOCK_N": "N", "BLOCK_K": "K", "BLOCK_M": "CHUNK"}))
    @triton.jit
    def _dw_kernel(dy_ptr, xq_ptr, sx_ptr, sw_ptr, out_ptr, M, N, K, M_KEY, CHUNK,
                   PARTIAL: tl.constexpr, MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
        """``g.T @ x_q`` over the tokens of chunk ``program_id(1)``; with one chunk, divided by s_w and cast (the
        gradient), else fp32 partial sums into ``out[chunk]`` for ``_dw_reduce_kernel``."""
        pid_n, pid_k = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        sw = tl.load(sw_ptr)
        m_start = tl.program_id(1) * CHUNK
        rm = m_start + tl.arange(0, BLOCK_M)
        dy_ptrs = dy_ptr + rm.to(tl.int64)[None, :] * N + (rn % N)[:, None]
        x_ptrs = xq_ptr + rm.to(tl.int64)[:, None] * K + (rk % K)[None, :]
        m_end = tl.minimum(m_start + CHUNK, M)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for m0 in range(0, CHUNK, BLOCK_M):
            in_chunk = m_start + m0 + tl.arange(0, BLOCK_M) < m_end
            s = tl.load(sx_ptr + m_start + m0 + tl.arange(0, BLOCK_M), mask=in_chunk, other=0.0) * sw
            dy_t = tl.load(dy_ptrs, mask=in_chunk[None, :], other=0.0)
            g_t = _cast(dy_t.to(tl.float32) * s[None, :], MM_DTYPE)
            xq = tl.load(x_ptrs, mask=in_chunk[:, None], other=0).to(tl.float32).to(MM_DTYPE)
            acc = _dot(g_t, xq, acc, PRECISION, UPCAST)
            dy_ptrs += BLOCK_M * N
            x_ptrs += BLOCK_M * K
        mask = (rn < N)[:, None] & (rk < K)[None, :]
        offs = rn.to(tl.int64)[:, None] * K + rk[None, :]
        if PARTIAL:
            tl.store(out_ptr + tl.program_id(1).to(tl.int64) * N * K + offs, acc, mask=mask)
        else:
            tl.store(out_ptr + offs, _cast(tl.math.div_rn(acc, sw), out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dw_reduce_kernel(part_ptr, sw_ptr, dw_ptr, numel, SPLIT, BLOCK: tl.constexpr):
        """dW from the chunks' partial sums, added in chunk order (deterministic), divided by s_w, cast once."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(0, SPLIT):
            acc += tl.load(part_ptr + s * numel + offs, mask=mask, other=0.0)
        tl.store(dw_ptr + offs, _cast(tl.math.div_rn(acc, tl.load(sw_ptr)), dw_ptr.dtype.element_ty), mask=mask)


def _device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _m_key(m: int) -> int:
    return _next_pow2(m)  # tune once per power of two of tokens, not for every batch size


def quantize_activations(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``int8_activation`` of the rows of a 2-D tensor: int8 codes (contiguous) and fp32 scales of shape [M, 1]."""
    require()
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    m, k = x2d.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x2d.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x2d.device)
    if m == 0:
        return q, s
    block_k = min(_next_pow2(k), _ACT_BLOCK)
    block_m = max(1, _ACT_BLOCK // block_k)
    with _device(x2d):
        _act_quant_kernel[(_cdiv(m, block_m),)](x2d, q, s, m, k, x2d.stride(0), EPS,
                                                BLOCK_M=block_m, BLOCK_K=block_k)
    return q, s


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ternary_weight``: int8 codes in {-1, 0, 1} (w's shape, contiguous) and the 0-d fp32 scale."""
    require()
    w = w.contiguous()
    numel = w.numel()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    s = torch.empty((), dtype=torch.float32, device=w.device)
    blocks = _cdiv(numel, _W_BLOCK)
    parts = max(1, min(blocks, _W_PARTS))
    partials = torch.empty(parts, dtype=torch.float32, device=w.device)
    with _device(w):
        _abs_sum_kernel[(parts,)](w, partials, numel, _cdiv(blocks, parts), BLOCK=_W_BLOCK)
        _ternary_kernel[(max(blocks, 1),)](w, partials, q, s, numel, float(numel), parts, EPS,
                                           BLOCK=_W_BLOCK, PARTS=_next_pow2(parts))
    return q, s


def forward(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype):
    """``_BitLinearSTE``'s forward: ``(y, x_q, w_q, s_x, s_w)`` with y shaped ``[..., N]`` in ``out_dtype`` and the
    codes (int8, 2-D) and scales for backward."""
    require()
    for name, t in (("input", x), ("weight", weight)):
        if t.dtype not in _FLOATS:
            raise TypeError(f"BITNET_KERNEL=triton: the {name} must be float32, bfloat16 or float16, got {t.dtype}")
    k = x.shape[-1]
    n = weight.shape[0]
    x_q, s_x = quantize_activations(x.reshape(-1, k))
    w_q, s_w = quantize_weight(weight)
    m = x_q.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m and n:
        grid = lambda meta: (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        with _device(x):
            _fwd_kernel[grid](x_q, w_q, s_x, s_w, y, m, n, k, _m_key(m))
    return y.reshape(*x.shape[:-1], n), x_q, w_q, s_x, s_w


def _precision(mm_dtype: torch.dtype) -> str:
    return "tf32" if mm_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _dw_split(m: int, n: int, k: int, device: torch.device) -> int:
    """Token chunks for dW: its output (N x K) is small next to the token dimension it sums over, so on its own it
    would occupy a few SMs; chunks, each summed by its own programs, fill about two waves of the GPU."""
    sms = _sm_count(device)
    tiles = _cdiv(n, 128) * _cdiv(k, 128)
    return max(1, min(_cdiv(2 * sms, tiles), m // (4 * _SPLIT_ALIGN)))


def backward(dy: torch.Tensor, x_q: torch.Tensor, w_q: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor,
             mm_dtype: torch.dtype, x_dtype: torch.dtype, w_dtype: torch.dtype, need_dx: bool, need_dw: bool,
             split: int | None = None):
    """``_BitLinearSTE``'s backward from the saved 2-D codes: ``(dx [M, K] or None, dW [N, K] or None)``.
    ``split`` overrides the token chunks of dW (tests)."""
    require()
    n, k = w_q.shape
    dy = dy.reshape(-1, n).contiguous()
    m = dy.shape[0]
    tl_mm, precision = _TL_DTYPE[mm_dtype], _precision(mm_dtype)
    dx = dw = None
    with _device(dy):
        if need_dx:
            dx = torch.empty((m, k), dtype=x_dtype, device=dy.device)
            if m and k:
                grid = lambda meta: (_cdiv(m, meta["BLOCK_M"]) * _cdiv(k, meta["BLOCK_K"]),)  # noqa: E731
                _dx_kernel[grid](dy, w_q, s_x, s_w, dx, m, n, k, _m_key(m), MM_DTYPE=tl_mm, PRECISION=precision,
                                 UPCAST=INTERPRET)
            if not n:
                dx.zero_()
        if need_dw:
            dw = torch.empty((n, k), dtype=w_dtype, device=dy.device)
            splits = split or _dw_split(m, n, k, dy.device)
            chunk = _cdiv(_cdiv(m, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN if m else _SPLIT_ALIGN
            splits = max(1, _cdiv(m, chunk))
            out = dw if splits == 1 else torch.empty((splits, n, k), dtype=torch.float32, device=dy.device)
            if n and k:
                grid = lambda meta: (_cdiv(n, meta["BLOCK_N"]) * _cdiv(k, meta["BLOCK_K"]), splits)  # noqa: E731
                _dw_kernel[grid](dy, x_q, s_x, s_w, out, m, n, k, _m_key(m), chunk, PARTIAL=splits > 1,
                                 MM_DTYPE=tl_mm, PRECISION=precision, UPCAST=INTERPRET)
                if splits > 1:
                    _dw_reduce_kernel[(_cdiv(n * k, _W_BLOCK),)](out, s_w, dw, n * k, splits, BLOCK=_W_BLOCK)
    return dx, dw
