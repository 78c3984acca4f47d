"""The exported student: packed file size vs the fp16 teacher, and load time and generation speed of the stock
transformers load of the export vs the teacher, side by side in one process.

The teacher is saved with ``save_pretrained`` in float16 (the baseline a user would ship). The student is the same
model patched (``bitnet.patch_model``) and written by ``bitnet.save_ternary_pretrained`` (what the export stage
writes: block linear layers as 2-bit packed codes + one scale each, everything else as in the model, here float16).
Sizes, load time and speed depend only on the architecture, not on the values of dW, so dW = 0 here.

Load: ``AutoModelForCausalLM.from_pretrained(path, dtype=...)`` of each directory, interleaved (files warm in the OS
page cache). Generation: greedy ``generate`` of exactly ``--new-tokens`` tokens after ``--prompt-len`` real tokens,
``--batch`` prompts at once, interleaved; both models in the compute dtype (fp32 on CPU, bf16 on CUDA).
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/export.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import (compute_dtype, interleave, median, parser, ratio, report, setup, sync, table, teacher,
                          token_rows)
from bitnet import patch_model, save_ternary_pretrained


def file_bytes(directory: Path) -> int:
    return (directory / "model.safetensors").stat().st_size


def measure(kind: str, args, device, root: Path) -> dict:
    import transformers as tf

    fp16, info = teacher(kind, torch.device("cpu"), torch.float16)
    teacher_dir, student_dir = root / f"{kind}-teacher-fp16", root / f"{kind}-student"
    fp16.save_pretrained(teacher_dir)
    sizes = save_ternary_pretrained(patch_model(copy.deepcopy(fp16)), student_dir)
    del fp16
    dtype = compute_dtype(device)

    def load(directory: Path):
        model = tf.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
        sync(device)
        return model

    def timed_load(directory: Path) -> None:
        load(directory)  # timed by interleave, model dropped

    loads = interleave({"teacher": lambda: timed_load(teacher_dir), "student": lambda: timed_load(student_dir)},
                       args.repeats, device)

    models = {"teacher": load(teacher_dir), "student": load(student_dir)}
    ids, mask = token_rows(args.batch, args.prompt_len, split="eval")
    ids, mask = ids.to(device), mask.to(device)

    def generate(model) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        sync(device)
        assert out.shape[1] == ids.shape[1] + args.new_tokens
        return time.perf_counter() - start

    gen = interleave({name: (lambda m=m: generate(m)) for name, m in models.items()}, args.repeats, device,
                     warmup=2)
    new_tokens = args.batch * args.new_tokens
    kinds = sorted({type(m).__name__ for m in models["student"].modules() if "Linear" in type(m).__name__})
    return {**info, "dtype": str(dtype), "linear_classes_in_student": kinds,
            "packed_linear_bytes": sizes["packed_bytes"], "fp16_linear_bytes": sizes["fp16_bytes"],
            "linear_compression": sizes["compression"], "num_packed_layers": sizes["num_packed_layers"],
            "teacher_file_bytes": file_bytes(teacher_dir), "student_file_bytes": file_bytes(student_dir),
            "load_s": loads, "load_median_s": {k: median(v) for k, v in loads.items()},
            "load_ratio_student_over_teacher": ratio(loads["student"], loads["teacher"]),
            "generate_s": gen, "tokens_per_s": {k: new_tokens / median(v) for k, v in gen.items()},
            "speed_ratio_student_over_teacher": ratio(gen["teacher"], gen["student"]),
            "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}


def main(argv=None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--teachers", nargs="+", default=["quickstart", "large"], choices=["quickstart", "large"])
    p.add_argument("--batch", type=int, default=4, help="prompts generated at once")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.set_defaults(repeats=5)
    args = p.parse_args(argv)
    device = setup(args)
    root = Path(tempfile.mkdtemp(prefix="bench-export-"))
    results = []
    for kind in args.teachers:
        print(f"{kind}: export, {args.repeats} interleaved loads and generations", flush=True)
        results.append(measure(kind, args, device, root))
    mib = 2**20
    size_rows = [[r["teacher"], r["source"], r["parameters"], r["fp16_linear_bytes"] / mib,
                  r["packed_linear_bytes"] / mib, r["linear_compression"], r["teacher_file_bytes"] / mib,
                  r["student_file_bytes"] / mib, r["teacher_file_bytes"] / r["student_file_bytes"]] for r in results]
    speed_rows = [[r["teacher"], r["dtype"].replace("torch.", ""), r["load_median_s"]["teacher"],
                   r["load_median_s"]["student"], r["load_ratio_student_over_teacher"]["median"],
                   r["tokens_per_s"]["teacher"], r["tokens_per_s"]["student"],
                   r["speed_ratio_student_over_teacher"]["median"],
                   f"{r['speed_ratio_student_over_teacher']['min']:.2f}-"
                   f"{r['speed_ratio_student_over_teacher']['max']:.2f}"] for r in results]
    tables = {
        "Exported student (transformers bitnet format) vs fp16 teacher: file sizes": table(
            ["teacher", "weights", "parameters", "block linears fp16 MiB", "block linears packed MiB",
             "linears fp16 / packed", "teacher file MiB (fp16)", "student file MiB", "whole file fp16 / student"],
            size_rows),
        f"Stock AutoModelForCausalLM load and greedy generation ({args.batch} prompts x {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens each)": table(
            ["teacher", "dtype", "teacher load s", "student load s", "load student / teacher", "teacher new tok/s",
             "student new tok/s", "speed student / teacher", "range"], speed_rows),
    }
    report("export", args, device, tables, {"results": results, "dir": str(root)})


if __name__ == "__main__":
    main()
