"""llama.cpp speed of the ternary student against its teacher, all four in one process: the student in TQ2_0 and in
TQ1_0 (``bitnet.save_gguf``), the teacher in F16 and in Q8_0 (``bitnet.gguf.save_teacher_gguf``). Decode tokens/s
(batch 1, one token per call after the prompt) and prompt-processing tokens/s, each variant timed once per round with
the order alternating; file sizes.

The teachers are randomly initialised Llamas (speed does not depend on the weights' values) whose block linear layers
dominate and whose dimensions are multiples of 256 (hidden H, SwiGLU width 2.75 H rounded to 256, heads of 64, the
quickstart tokenizer's 4096-token vocabulary, untied head). The student is naive ternary quantization of the teacher
(dW = 0): a trained one has the same shapes, hence the same speed. llama.cpp runs with ``--threads`` threads
(default 1: on a shared CPU, threads that spin while waiting for each other make decode timings collapse; with more
than one thread ``OMP_WAIT_POLICY`` is set to PASSIVE unless it is set already).

    .venv/bin/python -m bench.gguf_speed                          # hidden 1024 x 8 layers and 2048 x 16
    .venv/bin/python -m bench.gguf_speed --sizes 2048x16 --threads 2
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/gguf_speed.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import QUICKSTART, VOCAB, interleave, median, parser, ratio, report, setup, table  # noqa: E402

VARIANTS = ("student TQ2_0", "student TQ1_0", "teacher F16", "teacher Q8_0")


def random_teacher(hidden: int, layers: int, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    width = 256 * max(1, round(hidden * 11 / 4 / 256))
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=width, num_hidden_layers=layers,
                            num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                            max_position_embeddings=2048, tie_word_embeddings=False)
    return tf.LlamaForCausalLM(config).eval().requires_grad_(False)


def write_files(hidden: int, layers: int, directory: Path, embeddings: str) -> tuple[dict[str, Path], dict]:
    """The four GGUF files of one size, and the teacher's parameter counts."""
    from transformers import AutoTokenizer

    from bitnet import patch_model, save_gguf
    from bitnet.gguf import save_teacher_gguf

    tokenizer = AutoTokenizer.from_pretrained(QUICKSTART)
    model = random_teacher(hidden, layers)
    dual = patch_model(model, delta="lora:1")  # dW = B @ A with B = 0: the naive student, no weight-sized dW
    linear = sum(layer.weight.numel() for layer in dual.layers.values())
    info = {"parameters": sum(p.numel() for n, p in model.named_parameters() if ".delta." not in n),
            "block_linear_parameters": linear}
    paths = {name: directory / f"{name.replace(' ', '-')}.gguf" for name in VARIANTS}
    fallback = save_gguf(dual, paths["student TQ2_0"], tokenizer, "tq2_0", embeddings)["fallback"]
    save_gguf(dual, paths["student TQ1_0"], tokenizer, "tq1_0", embeddings)
    save_teacher_gguf(dual, paths["teacher F16"], tokenizer, "f16", "f16")
    save_teacher_gguf(dual, paths["teacher Q8_0"], tokenizer, "q8_0", "q8_0")  # as llama.cpp's --outtype q8_0
    assert not fallback, fallback  # every dimension a multiple of 256
    info["block_linear_share"] = linear / info["parameters"]
    del dual, model
    gc.collect()
    return paths, info


def timed_variants(models: dict, prompt: list[int], new: list[int]) -> dict:
    """Two callables per model: prompt processing (the prompt from an empty cache) and decode (``new`` tokens one at a
    time after the prompt, which is processed untimed). Each returns its own elapsed seconds."""
    import time

    def prompt_processing(llm):
        def run():
            llm.reset()
            start = time.perf_counter()
            llm.eval(prompt)
            return time.perf_counter() - start
        return run

    def decode(llm):
        def run():
            llm.reset()
            llm.eval(prompt)
            start = time.perf_counter()
            for token in new:
                llm.eval([token])
            return time.perf_counter() - start
        return run

    variants = {}
    for name, llm in models.items():
        variants[f"{name} | decode"] = decode(llm)
        variants[f"{name} | prompt"] = prompt_processing(llm)
    return variants


def measure(hidden: int, layers: int, args) -> dict:
    import llama_cpp

    from bench.common import token_rows

    ids, _ = token_rows(1, seq_len=args.prompt + args.new_tokens, split="eval")
    prompt, new = ids[0, : args.prompt].tolist(), ids[0, args.prompt:].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        paths, info = write_files(hidden, layers, Path(args.keep or tmp), args.embeddings)
        sizes = {name: path.stat().st_size for name, path in paths.items()}
        models = {name: llama_cpp.Llama(str(path), n_ctx=args.prompt + args.new_tokens + 8, n_batch=args.prompt,
                                        n_ubatch=args.prompt, n_threads=args.threads, n_threads_batch=args.threads,
                                        verbose=False)
                  for name, path in paths.items()}
        try:
            times = interleave(timed_variants(models, prompt, new), args.repeats, torch.device("cpu"))
        finally:
            for llm in models.values():
                llm.close()
    out = {"size": f"{hidden}x{layers}", "hidden": hidden, "layers": layers, **info, "bytes": sizes, "seconds": times}
    for kind, count in (("decode", len(new)), ("prompt", len(prompt))):
        out[f"{kind}_tokens_per_s"] = {name: count / median(times[f"{name} | {kind}"]) for name in VARIANTS}
        for base in ("teacher F16", "teacher Q8_0"):  # speed-up: the teacher's seconds over the variant's, per round
            out[f"{kind}_speedup_vs_{base.split()[1]}"] = {
                name: ratio(times[f"{base} | {kind}"], times[f"{name} | {kind}"]) for name in VARIANTS}
    return out


def size_table(r: dict) -> str:
    rows = []
    for name in VARIANTS:
        d = lambda kind, base: r[f"{kind}_speedup_vs_{base}"][name]  # noqa: E731
        span = lambda x: f"{x['median']:.2f} ({x['min']:.2f}-{x['max']:.2f})"  # noqa: E731
        rows.append([name, r["bytes"][name] / 2**20, r["bytes"]["teacher F16"] / r["bytes"][name],
                     r["decode_tokens_per_s"][name], span(d("decode", "F16")), span(d("decode", "Q8_0")),
                     r["prompt_tokens_per_s"][name], span(d("prompt", "F16")), span(d("prompt", "Q8_0"))])
    return table(["model", "file MiB", "F16 size / size", "decode tok/s", "decode x F16", "decode x Q8_0",
                  "prompt tok/s", "prompt x F16", "prompt x Q8_0"], rows)


def main(argv=None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(repeats=3)
    p.add_argument("--sizes", nargs="+", default=["1024x8", "2048x16"], help="HIDDENxLAYERS (multiples of 256)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per round")
    p.add_argument("--embeddings", default="f16", choices=["f16", "q8_0"], help="the students' embeddings and head")
    p.add_argument("--keep", default=None, help="write the GGUF files here (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.threads > 1:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args.threads = max(args.threads, 1)  # llama.cpp's threads; torch (which only builds the models) gets as many
    device = setup(args)
    import llama_cpp

    results = {"llama_cpp_python": llama_cpp.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "llama_cpp_threads": args.threads, "sizes": []}
    tables = {}
    for size in args.sizes:
        hidden, layers = map(int, size.split("x"))
        r = measure(hidden, layers, args)
        results["sizes"].append(r)
        title = (f"hidden {hidden}, {layers} layers ({r['parameters'] / 1e6:.0f}M parameters, block linear layers "
                 f"{r['block_linear_share']:.0%}): llama.cpp, {args.threads} thread(s), prompt {args.prompt}, "
                 f"{args.new_tokens} new tokens, medians of {args.repeats} rounds (per-round ratio range)")
        tables[title] = size_table(r)
    report("gguf_speed", args, device, tables, results)


if __name__ == "__main__":
    main()
