"""How closely llama.cpp runs the exported GGUF student: its logits against our student's on held-out rows (KL, top-1
agreement), and held-out perplexity through llama.cpp against ours.

The student is the quickstart teacher with a trained dW (``--weights``: a self_distill stage's
``weights.safetensors``; without it, dW = 0, the naive ternary student). It is written by ``bitnet.save_gguf`` in
TQ2_0 and TQ1_0 and each file runs in llama.cpp (llama-cpp-python, one row at a time from an empty cache, the KV cache
in its default fp16).

llama.cpp does not compute exactly what our student computes. It quantizes a TQ layer's activations to int8 per
256-value block (Q8_K) where the student quantizes them per token; a layer that falls back to Q8_0 gets Q8_0
activations (per 32 values, fp16 scale) and one in F16 gets fp16 activations, not quantized at all; and the weight
scales are rounded to fp16. To say how much each part matters, the student also runs in PyTorch with llama.cpp's
activation quantization emulated (``emulated``), and with fp16 weight scales on top of that. A second table repeats
the activation comparison on a random Llama of hidden size 1024 (rows of 1024 and 2816 values: four and eleven
Q8_K blocks per token, where the quickstart teacher's rows of 256 are one).

    .venv/bin/python -m bench.gguf_fidelity --weights artifacts/runs/<run>/self_distill-<fp>/weights.safetensors
"""

from __future__ import annotations

import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/gguf_fidelity.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import QUICKSTART, parser, report, setup, table, teacher, token_rows  # noqa: E402

Q8_K, Q8_0 = 256, 32  # values per activation block in llama.cpp's dot products with TQ and Q8_0 weights
Q8K_ONLY = "ours, Q8_K activations in the TQ layers"
ACTIVATIONS = "ours, llama.cpp's activations in every layer"
EMULATION = "ours, llama.cpp's activations + fp16 scales"


def q8_k(x: torch.Tensor) -> torch.Tensor:
    """ggml's quantize_row_q8_K then dequantization: per 256 values, the largest-magnitude value maps to -127."""
    blocks = x.reshape(*x.shape[:-1], -1, Q8_K)
    index = blocks.abs().argmax(-1, keepdim=True)
    signed_max = blocks.gather(-1, index)
    iscale = torch.where(signed_max == 0, torch.zeros_like(signed_max), -127.0 / signed_max)
    q = (blocks * iscale).round().clamp(max=127)
    d = torch.where(signed_max == 0, torch.zeros_like(signed_max), 1.0 / iscale)
    return (q * d).reshape(x.shape)


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """ggml's quantize_row_q8_0 then dequantization: per 32 values, scale amax / 127 stored in fp16."""
    blocks = x.reshape(*x.shape[:-1], -1, Q8_0)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    return ((blocks * inverse).round() * d.half().float()).reshape(x.shape)


def llama_cpp_activations(x: torch.Tensor, fallbacks: bool = True) -> torch.Tensor:
    """The activations llama.cpp multiplies a ternary layer's weights with, by the type the layer is written in
    (``fallbacks`` False: only the TQ layers' Q8_K; the others quantized per token, as ours)."""
    from bitnet.quant import int8_activation

    n = x.shape[-1]
    if n % Q8_K == 0:
        return q8_k(x)
    if not fallbacks:
        codes, scale = int8_activation(x)
        return codes * scale
    if n % Q8_0 == 0:
        return q8_0(x)
    return x.half().float()  # F16 weights: fp16 activations, not quantized


@contextmanager
def emulated(fallbacks: bool = True, fp16_scales: bool = False):
    """BitLinear's numerics with llama.cpp's activation quantization (``llama_cpp_activations``) and, with
    ``fp16_scales``, the weight scale rounded to fp16 as the GGUF blocks store it."""
    from bitnet import quant

    def operands(x, weight, mm_dtype):
        w_q, w_scale = quant.ternary_weight(weight)
        if fp16_scales:
            w_scale = w_scale.half().float()
        x_deq = llama_cpp_activations(x.float(), fallbacks)
        one = torch.ones((), dtype=torch.float32, device=x.device)
        return x_deq.to(mm_dtype), w_q.to(mm_dtype), None, None, one, w_scale

    original = quant._EAGER
    quant._EAGER = quant._Elementwise(operands, quant._scaled, quant._unscaled)
    try:
        yield
    finally:
        quant._EAGER = original


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    log_p, log_q = F.log_softmax(p.float(), -1), F.log_softmax(q.float(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def top1(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p.argmax(-1) == q.argmax(-1)).float().mean())


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)).exp())


def llama_cpp_logits(path: Path, ids: torch.Tensor, threads: int) -> torch.Tensor:
    import llama_cpp

    n = ids.shape[1]
    llm = llama_cpp.Llama(str(path), n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True, n_threads=threads,
                          verbose=False)
    try:
        out = []
        for row in ids:
            llm.reset()
            llm.eval(row.tolist())
            out.append(torch.from_numpy(np.array(llm.scores[:n])))
        return torch.stack(out)
    finally:
        llm.close()


def forward(dual, ids: torch.Tensor, batch: int = 16) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([dual(ids[i:i + batch]).logits.float() for i in range(0, len(ids), batch)])


def quickstart_student(ids: torch.Tensor, weights: str | None, threads: int, root: Path) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from bitnet import patch_model, save_gguf

    model, _ = teacher("quickstart", torch.device("cpu"), torch.float32)
    dual = patch_model(model)
    if weights:
        dual.load_delta_state_dict(load_file(weights))
    with dual.teacher():
        logits = {"teacher": forward(dual, ids)}
    with dual.student():
        logits["student (ours)"] = forward(dual, ids)
        with emulated(fallbacks=False):
            logits[Q8K_ONLY] = forward(dual, ids)
        with emulated():
            logits[ACTIVATIONS] = forward(dual, ids)
        with emulated(fp16_scales=True):
            logits[EMULATION] = forward(dual, ids)
    tokenizer = AutoTokenizer.from_pretrained(QUICKSTART)
    files = {}
    for qtype in ("tq2_0", "tq1_0"):
        info = save_gguf(dual, root / f"student-{qtype}.gguf", tokenizer, qtype)
        files[qtype] = {k: info[k] for k in ("bytes", "fallback")}
        logits[f"llama.cpp {qtype.upper()}"] = llama_cpp_logits(root / f"student-{qtype}.gguf", ids, threads)
    ours, base = logits["student (ours)"], logits["teacher"]
    rows = {name: {"perplexity": perplexity(x, ids), "perplexity_vs_ours": perplexity(x, ids) / perplexity(ours, ids),
                   "kl_ours_to_it": kl(ours, x), "top1_agreement_with_ours": top1(ours, x),
                   "kl_teacher_to_it": kl(base, x)} for name, x in logits.items()}
    for qtype in ("TQ2_0", "TQ1_0"):
        rows[f"llama.cpp {qtype}"]["kl_emulation_to_it"] = kl(logits[EMULATION], logits[f"llama.cpp {qtype}"])
    return {"weights": weights or "none (dW = 0: naive ternary)", "files": files, "metrics": rows}


def wide_model(ids: torch.Tensor) -> dict:
    """Per-token against per-256-block activation quantization where a row holds several blocks."""
    from bitnet import patch_model

    model, info = teacher("large", torch.device("cpu"), torch.float32)
    dual = patch_model(model, delta="lora:1")
    with dual.teacher():
        base = forward(dual, ids)
    with dual.student():
        ours = forward(dual, ids)
        with emulated():
            blocks = forward(dual, ids)
    return {"model": info, "kl_teacher_to_ours": kl(base, ours), "kl_teacher_to_emulated": kl(base, blocks),
            "kl_ours_to_emulated": kl(ours, blocks), "top1_agreement": top1(ours, blocks)}


def main(argv=None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="a self_distill stage's weights.safetensors (dW) for the "
                                                   "quickstart teacher; default dW = 0")
    p.add_argument("--rows", type=int, default=64, help="held-out rows of 128 tokens")
    args = p.parse_args(argv)
    device = setup(args)
    ids, _ = token_rows(args.rows, split="eval")  # packed: every position a real token
    with tempfile.TemporaryDirectory() as tmp:
        quick = quickstart_student(ids, args.weights, max(args.threads, 1), Path(tmp))
    wide = wide_model(ids[: min(16, args.rows)])
    m = quick["metrics"]
    rows = [[name, r["perplexity"], f"{100 * (r['perplexity_vs_ours'] - 1):+.2f}%",
             "-" if name == "student (ours)" else f"{r['kl_ours_to_it']:.2e}",
             "-" if name == "student (ours)" else f"{r['top1_agreement_with_ours']:.4f}",
             "-" if name == "teacher" else f"{r['kl_teacher_to_it']:.4f}",
             f"{r['kl_emulation_to_it']:.2e}" if "kl_emulation_to_it" in r else "-"] for name, r in m.items()]
    tables = {
        f"The quickstart student ({quick['weights']}) in llama.cpp, {args.rows} held-out rows of 128 tokens": table(
            ["model", "perplexity", "vs ours", "KL(ours ‖ it)", "top-1 with ours", "KL(teacher ‖ it)",
             "KL(emulation ‖ it)"], rows),
        "Per-token (ours) against per-256-block (llama.cpp's Q8_K) activations, random Llama of hidden 1024": table(
            ["KL(teacher ‖ ours)", "KL(teacher ‖ per-block)", "KL(ours ‖ per-block)", "top-1 agreement"],
            [[f"{wide['kl_teacher_to_ours']:.4f}", f"{wide['kl_teacher_to_emulated']:.4f}",
              f"{wide['kl_ours_to_emulated']:.2e}", f"{wide['top1_agreement']:.4f}"]]),
    }
    report("gguf_fidelity", args, device, tables, {"quickstart": quick, "wide": wide})


if __name__ == "__main__":
    main()
