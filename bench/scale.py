"""Scale-out on Ray, timed side by side: the teacher cache stage and self-distillation training, on the local backend
(one process), on 1 Ray worker and on 2, one torch thread per process.

The teacher is the ``large`` random-weight Llama of bench/common.py (hidden 1024, its block linears most of its
parameters), saved as a Hugging Face directory so the pipeline's own loading runs; the tokens are the quickstart's
(the stdlib corpus, the quickstart tokenizer). Each variant runs the real stages (``distill.stage.execute``; the
cache's shards as Prefect tasks on prefect-ray's ``RayTaskRunner``, training through Ray Train's ``TorchTrainer``)
into a store of its own. Reported:

- cache: rows/s of the whole stage, Ray's start included (``--cache-rows`` rows, chunks of 16);
- training: tokens/s of the training steps themselves (from the loss history's per-step seconds, so Ray's start and
  the model's loading are left out), and the whole stage's wall time.

Rounds alternate the variants' order; ratios are medians of per-round ratios (bench/README.md).

    .venv/bin/python -m bench.scale --repeats 2
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process, workers included (they inherit it)

from bench.common import SHAPES, VOCAB, median, parser, ratio, report, setup, table  # noqa: E402

VARIANTS = {"local": {}, "ray, 1 worker": {"compute.backend": "ray", "compute.ray.workers": 1},
            "ray, 2 workers": {"compute.backend": "ray", "compute.ray.workers": 2}}


def save_teacher(directory: Path) -> Path:
    """The ``large`` random-weight Llama with the quickstart's tokenizer, as a Hugging Face directory."""
    import torch
    import transformers as tf

    from bench.common import QUICKSTART

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=1024, tie_word_embeddings=True,
                            num_key_value_heads=SHAPES["large"]["num_attention_heads"], **SHAPES["large"])
    tf.LlamaForCausalLM(config).save_pretrained(directory)
    tf.AutoTokenizer.from_pretrained(QUICKSTART).save_pretrained(directory)
    return directory


def plan(teacher: Path, root: Path, args, variant: dict, flow: str):
    from distill.plan import plan_run

    overrides = {"teacher.name_or_path": str(teacher), "teacher.dtype": "float32", "storage.root": str(root),
                 "data.seq_len": args.seq_len, "data.max_train_rows": args.cache_rows, "data.max_eval_rows": 32,
                 "cache.batch_size": 16, "cache.topk": 32, "cache.eval_samples": 16,
                 "self_distill.steps": args.steps, "train.batch_size": args.batch, "train.warmup_steps": 2,
                 "train.eval_every": 10_000, "train.checkpoint_every": 10_000, **variant}
    return plan_run(flow, "quickstart", overrides, logging.getLogger("bench"))[0]


def time_cache(teacher: Path, root: Path, args, variant: dict) -> float:
    """Rows per second of the whole teacher_cache stage (shards on Ray first where the backend is ray)."""
    from distill.stage import execute
    from distill.stages import STAGES
    from tasks.result_storage import result_storage
    from tasks.shards import run_shards

    run = plan(teacher, root, args, variant, "superposition-distill")
    tokens = execute(STAGES["tokenize"], run.context("tokenize"))
    started = time.perf_counter()
    if variant:
        stage, ctx = STAGES["teacher_cache"], run.context("teacher_cache")
        run_shards(run, "teacher_cache", stage.shards(ctx, run.config.compute.ray.workers, tokens=tokens),
                   result_storage(ctx.store), tokens=tokens)
    cache = execute(STAGES["teacher_cache"], run.context("teacher_cache"), tokens=tokens)
    seconds = time.perf_counter() - started
    return sum(split.rows for split in cache.splits.values()) / seconds


def time_training(teacher: Path, root: Path, args, variant: dict) -> tuple[float, float]:
    """(tokens per second of the training steps, the stage's wall seconds) of self-distillation."""
    from distill.stage import execute
    from distill.stages import STAGES

    run = plan(teacher, root, args, variant, "self-distill")
    tokens = execute(STAGES["tokenize"], run.context("tokenize"))
    started = time.perf_counter()
    trained = execute(STAGES["self_distill"], run.context("self_distill"), tokens=tokens)
    wall = time.perf_counter() - started
    history = run.context("self_distill").store.read_json(trained.history)
    steps = history[1:]  # the first step of each process warms its kernels and allocator
    return len(steps) * args.batch * args.seq_len / sum(h["seconds"] for h in steps), wall


def main(argv=None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(repeats=2)
    p.add_argument("--cache-rows", type=int, default=512)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--skip", nargs="*", default=[], choices=["cache", "training"])
    args = p.parse_args(argv)
    device = setup(args)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: its telemetry only logs errors
    from prefect.testing.utilities import prefect_test_harness

    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        teacher = save_teacher(Path(tmp) / "large")
        cache = {name: [] for name in VARIANTS}
        steps, walls = ({name: [] for name in VARIANTS} for _ in range(2))
        for r in range(args.repeats):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                root = Path(tmp) / f"r{r}-{name.replace(' ', '').replace(',', '')}"
                if "cache" not in args.skip:
                    cache[name].append(time_cache(teacher, root / "cache", args, VARIANTS[name]))
                if "training" not in args.skip:
                    tokens_per_s, wall = time_training(teacher, root / "train", args, VARIANTS[name])
                    steps[name].append(tokens_per_s)
                    walls[name].append(wall)
                print(f"round {r}: {name} done", flush=True)

    rows, results = [], {"cache_rows_per_s": cache, "train_tokens_per_s": steps, "train_stage_seconds": walls}

    def side_by_side(a: list[float], b: list[float]):
        return ratio(a, b) if a and b else None

    figures = {
        "cache stage, 2 Ray workers / 1 (rows/s)": side_by_side(cache["ray, 2 workers"], cache["ray, 1 worker"]),
        "cache stage, 1 Ray worker / local (rows/s)": side_by_side(cache["ray, 1 worker"], cache["local"]),
        "training steps, 2 DDP workers / 1 (tokens/s)": side_by_side(steps["ray, 2 workers"], steps["ray, 1 worker"]),
        "training steps, 1 Ray worker / local (tokens/s)": side_by_side(steps["ray, 1 worker"], steps["local"]),
        "training stage wall time, 1 Ray worker / local": side_by_side(walls["ray, 1 worker"], walls["local"]),
    }
    for name, r in figures.items():
        if r is not None:
            rows.append([name, f"{r['median']:.2f}", f"{r['min']:.2f}-{r['max']:.2f}"])
    medians = [[name, f"{median(cache[name]):.1f}" if cache[name] else "", f"{median(steps[name]):.0f}"
                if steps[name] else "", f"{median(walls[name]):.0f}" if walls[name] else ""] for name in VARIANTS]
    tables = {"Ratios, side by side (median, range over rounds)": table(["figure", "ratio", "range"], rows),
              "Medians": table(["variant", "cache rows/s", "training tokens/s", "training stage s"], medians)}
    report("scale", args, device, tables, {**results, "ratios": figures})


if __name__ == "__main__":
    main()
