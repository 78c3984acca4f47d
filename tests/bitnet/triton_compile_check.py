"""Compile the Triton BitLinear kernels for an NVIDIA GPU without one: ``python -m tests.bitnet.triton_compile_check
[ARCH] [--all-configs]`` (ARCH 90 for Hopper, 80 for Ampere; default 90).

Triton lowers to PTX and assembles it with the ``ptxas`` its wheel ships, so the GPU path's code generation (the int8
and bf16 tensor-core instructions, shared memory per config) can be checked on a CPU machine; the interpreter tests
cannot see it (they run the kernels' Python, not the compiled code). Prints one JSON line per kernel and config, exits
1 if any fails to compile or needs more shared memory than an H100 has. Run without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import json
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bitnet import triton_bitlinear as tb

H100_SHARED_MEMORY = 232448  # bytes per block an H100 allows (227 KiB)


def kernels(all_configs: bool):
    """(name, kernel, argument types, constexprs, configs, whether its product must be a tensor-core instruction)."""
    i32 = "i32"
    mm = dict(M=i32, N=i32, K=i32, M_KEY=i32)
    first = (lambda configs: configs) if all_configs else (lambda configs: configs[-1:])  # the smallest tiles
    yield ("act_quant", tb._act_quant_kernel,
           dict(x_ptr="*bf16", q_ptr="*i8", s_ptr="*fp32", M=i32, K=i32, stride_xm=i32, eps="fp32"), {},
           [triton.Config({"BLOCK_M": 16, "BLOCK_K": 256}), triton.Config({"BLOCK_M": 1, "BLOCK_K": 4096})], False)
    yield ("abs_sum", tb._abs_sum_kernel, dict(w_ptr="*fp32", part_ptr="*fp32", numel=i32, ITERS=i32), {},
           [triton.Config({"BLOCK": tb._W_BLOCK})], False)
    yield ("ternary", tb._ternary_kernel,
           dict(w_ptr="*fp32", part_ptr="*fp32", q_ptr="*i8", s_ptr="*fp32", numel=i32, numel_f="fp32", n_parts=i32,
                eps="fp32"), {}, [triton.Config({"BLOCK": tb._W_BLOCK, "PARTS": tb._W_PARTS})], False)
    yield ("forward", tb._fwd_kernel,
           dict(xq_ptr="*i8", wq_ptr="*i8", sx_ptr="*fp32", sw_ptr="*fp32", y_ptr="*bf16", **mm), {},
           first(tb._FWD_CONFIGS), True)
    bf16 = {"MM_DTYPE": tl.bfloat16, "PRECISION": "ieee", "UPCAST": False}
    yield ("dx", tb._dx_kernel,
           dict(dy_ptr="*bf16", wq_ptr="*i8", sx_ptr="*fp32", sw_ptr="*fp32", dx_ptr="*fp32", **mm), bf16,
           first(tb._DX_CONFIGS), True)
    for partial in (False, True):
        yield (f"dw{' partial' if partial else ''}", tb._dw_kernel,
               dict(dy_ptr="*bf16", xq_ptr="*i8", sx_ptr="*fp32", sw_ptr="*fp32",
                    out_ptr="*fp32" if partial else "*bf16", CHUNK=i32, **mm), {**bf16, "PARTIAL": partial},
               first(tb._DW_CONFIGS), True)
    yield ("dw_reduce", tb._dw_reduce_kernel,
           dict(part_ptr="*fp32", sw_ptr="*fp32", dw_ptr="*bf16", numel=i32, SPLIT=i32), {},
           [triton.Config({"BLOCK": tb._W_BLOCK})], False)


def main(argv: list[str]) -> int:
    arch = int(next((a for a in argv if a.isdigit()), "90"))
    assert not tb.INTERPRET, "run without TRITON_INTERPRET=1: the interpreter's kernels do not compile"
    target = GPUTarget("cuda", arch, 32)
    failed = 0
    for name, kernel, types, constexprs, configs, needs_mma in kernels("--all-configs" in argv):
        fn = kernel.fn if hasattr(kernel, "configs") else kernel  # the JIT function under an autotuner
        for config in configs:
            consts = {**constexprs, **config.kwargs}
            signature = {arg: "constexpr" if arg in consts else types[arg] for arg in fn.arg_names}
            row = {"kernel": name, "config": config.kwargs, "warps": config.num_warps, "stages": config.num_stages}
            try:
                compiled = triton.compile(ASTSource(fn, signature, constexprs=consts), target=target,
                                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})
                ptx = compiled.asm["ptx"]
                row["shared_memory"] = compiled.metadata.shared
                row["mma"] = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else None
                row["ok"] = row["shared_memory"] <= H100_SHARED_MEMORY and (row["mma"] is not None or not needs_mma)
            except Exception as error:  # noqa: BLE001 - report every kernel, then fail
                row["ok"], row["error"] = False, repr(error)[:500]
            failed += not row["ok"]
            print(json.dumps(row, default=str), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
