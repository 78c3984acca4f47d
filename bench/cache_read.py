"""Reading the teacher cache: training-loop throughput with batches from the Zarr cache through the reader vs the
same batches from tensors already in memory, side by side in one process.

The consumer is the superposition stage's own training step (``distill.stages.superposition.superposition_trainable``
with the quickstart preset's student: every step fetches a batch, reconstructs the teacher's cached hidden state,
backward, clipping, AdamW). It is the cheapest step that reads the cache, so the one where reading weighs most. Both
variants train their own copy of the same student on the same schedule of rows: one through
``distill.rows.cached_rows`` (``TeacherCacheReader``: chunk decode, checksum check, stacking, as the stage
runs it), the other through a ``Rows`` that indexes tensors read out of the same cache beforehand. The cache is
written first, with the cache stage's writer and the teacher's real outputs (quickstart preset: last layer, float16,
zstd, top-k 32 in bit-shuffled LZ4, chunk = batch = 16 rows; ``--cache-layers`` and ``--logits`` cache inner layers
and sampled logits instead); the training reads what the stage reads (the tokens, every cached layer, which the
student reconstructs or matches, and, for the preset's KL term, the cached logits). The reader alone is also timed
reading the stage's arrays and every array, on this cache and on the
same cache with its top-k in zstd (``--topk-codecs``). Its files sit in the OS page cache, as they do after the
cache stage: this measures decoding and checking, not a cold disk. Target: cache / in-memory >= 0.9.
"""

from __future__ import annotations

import functools
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a script: python bench/cache_read.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import (TEACHERS, compute_dtype, interleave, median, optimiser_step, parser, ratio, report, setup,
                          shape_arguments, table, teacher, token_rows)
from distill.config import load_config
from distill.rows import Rows
from distill.rows import cached_rows
from distill.stages.superposition import build_student, inner_targets, superposition_trainable
from distill.stages.teacher_cache import TeacherForward
from distill.teacher import resolve_layers
from storage import ArtifactStore
from storage.cache import TeacherCacheReader, TeacherCacheSpec, TeacherCacheWriter
from storage.cache_spec import LOGIT_ARRAYS, TOPK_CODEC

TARGET = 0.9


def build_cache(model, store: ArtifactStore, path: str, rows: int, cfg, device, topk_codec: str) -> list[int]:
    """The cache stage's writes, with the teacher's outputs on ``rows`` real rows; returns the cached layers."""
    ids, mask = token_rows(rows, cfg.data.seq_len)
    layers = resolve_layers(cfg.cache.layers, model.config.num_hidden_layers)
    spec = TeacherCacheSpec(num_samples=rows, seq_len=cfg.data.seq_len, layers=layers,
                            hidden_size=model.config.hidden_size, dtype=cfg.cache.dtype, codec=cfg.cache.codec,
                            topk_codec=topk_codec, chunk_size=cfg.cache.batch_size, topk=cfg.cache.topk,
                            fingerprint="bench", logits=cfg.cache.logits)
    forward = TeacherForward(model, layers, cfg.cache.topk, logits=cfg.cache.logits)
    with TeacherCacheWriter(store, path, spec) as writer:
        for chunk in writer.missing_chunks():
            i, m = (t[chunk * spec.chunk_size:(chunk + 1) * spec.chunk_size] for t in (ids, mask))
            out = forward(i.to(device), m.to(device), seed=chunk)
            writer.write_chunk(chunk, {"input_ids": i, "attention_mask": m, **out})
    return layers


def in_memory(store: ArtifactStore, path: str) -> Rows:
    """The whole cache read into tensors once (as ``cached_rows`` converts them), indexed per batch."""
    reader = TeacherCacheReader(store, path)
    data = reader.get_batch(np.arange(len(reader)))
    data["input_ids"], data["attention_mask"] = data["input_ids"].long(), data["attention_mask"].long()
    return Rows(len(reader), lambda index: {k: v[torch.from_numpy(index)] for k, v in data.items()},
                chunk_size=reader.spec.chunk_size)


def cache_overrides(args) -> dict:
    """The cached layers and logits (``--cache-layers``, ``--logits``), where they differ from the preset's."""
    return ({"cache.layers": args.cache_layers} if args.cache_layers else {}) | (
        {"cache.logits": args.logits} if args.logits else {})


def student_overrides(args) -> dict:
    """The preset's student, with ``--student-dim`` (in heads 64 wide, as Llama-3.2-1B's are) and
    ``--student-layers``."""
    out = {}
    if args.student_dim is not None:
        if args.student_dim < 64 or args.student_dim % 64:
            raise SystemExit(f"--student-dim {args.student_dim}: give a positive multiple of 64 (heads are 64 wide)")
        out |= {"student.dim": args.student_dim, "student.n_heads": args.student_dim // 64}
    if args.student_layers is not None:
        out["student.n_layers"] = args.student_layers
    return out


def bench_cache(path: str) -> SimpleNamespace:
    """What ``cached_rows`` reads of a teacher_cache manifest, for a cache this script built (fingerprint "bench")."""
    return SimpleNamespace(splits={"train": SimpleNamespace(path=path)}, fingerprint="bench")


def compare(kind: str, args, device, store: ArtifactStore) -> dict:
    cfg = load_config("quickstart", {"train.batch_size": args.batch, "cache.batch_size": args.batch,
                                     **student_overrides(args), **cache_overrides(args)})
    model, info = teacher(kind, device, compute_dtype(device), layers=args.shape_layers)
    paths = {codec: f"read-{kind}-{i}" for i, codec in enumerate(args.topk_codecs)}
    for codec, p in paths.items():
        layers = build_cache(model, store, p, args.rows, cfg, device, codec)
    del model
    path, target = paths[args.topk_codecs[0]], f"hidden/layer_{layers[-1]}"
    # what the superposition stage reads: every cached layer (the target, and the inner ones it matches), and the
    # cached logits for the preset's KL term
    arrays = [f"hidden/layer_{i}" for i in layers]
    arrays += list(LOGIT_ARRAYS[cfg.cache.logits]) if cfg.superposition.kl_weight else []
    stage_rows = cached_rows(store, bench_cache(path), "train", arrays)
    sources = {"in-memory tensors": in_memory(store, path), "Zarr cache (reader)": stage_rows}
    steps = {}
    for name, rows in sources.items():
        student, projector = build_student(cfg, info["vocab"], info["hidden_size"])  # same seed: same weights
        inner = inner_targets(cfg, layers, student, projector, info["hidden_size"])
        trainable = superposition_trainable(student, projector, cfg, rows, target, device, inner=inner)
        optimizer = torch.optim.AdamW(trainable.parameters, lr=cfg.train.lr)
        counter = iter(range(10**9))

        def one_pass(trainable=trainable, optimizer=optimizer, counter=counter):
            for _ in range(args.steps):
                step = next(counter)
                optimiser_step(trainable.parameters, optimizer, lambda: trainable.loss(step)[0], device)
        steps[name] = one_pass
    times = interleave(steps, args.repeats, device)

    # the fetch alone (no training), same schedule, to say what the reader costs per batch
    def fetch_only(rows: Rows) -> float:
        from distill.loop import BatchSchedule

        schedule = BatchSchedule(rows.count, args.batch, cfg.seed, rows.chunk_size)
        start = time.perf_counter()
        for step in range(args.steps):
            rows.fetch(schedule.indices(step))
        return (time.perf_counter() - start) / args.steps

    def fetch_fresh(path: str, arrays: list[str] | None) -> float:  # a new reader each time: nothing decoded yet
        return fetch_only(cached_rows(store, bench_cache(path), "train", arrays))

    # the reader alone, side by side: as the stage reads (tokens and its target), and every array per top-k codec
    variants = {"stage's arrays": functools.partial(fetch_fresh, path, arrays)}
    variants |= {f"all arrays, top-k {c}": functools.partial(fetch_fresh, p, None) for c, p in paths.items()}
    fetch_times = interleave(variants, args.repeats, device)
    first_all = f"all arrays, top-k {args.topk_codecs[0]}"
    fetch = {"in-memory tensors": fetch_only(sources["in-memory tensors"]),
             "Zarr cache (reader)": median(fetch_times["stage's arrays"])}
    for p in paths.values():
        store.delete(p)
    tokens = args.steps * args.batch * cfg.data.seq_len
    return {**info, "student_dim": cfg.student.dim, "student_layers": cfg.student.n_layers, "batch": args.batch, "steps_per_pass": args.steps,
            "cache_rows": args.rows, "chunks": -(-args.rows // args.batch), "dtype": cfg.cache.dtype,
            "codec": cfg.cache.codec, "topk": cfg.cache.topk, "topk_codecs": args.topk_codecs, "target": target,
            "layers": layers, "logits": cfg.cache.logits, "arrays_read": arrays,
            "seconds": times, "tokens_per_s": {k: tokens / median(v) for k, v in times.items()},
            "fetch_s_per_batch": fetch, "fetch_s_per_batch_variants": fetch_times,
            # reading every array / only the stage's: above 1, reading only what the stage uses is faster
            "fetch_ratio_all_over_stage": ratio(fetch_times[first_all], fetch_times["stage's arrays"]),
            # every array with another top-k codec / with the first: above 1, the first reads faster
            "fetch_ratio_other_topk_codecs": {c: ratio(fetch_times[f"all arrays, top-k {c}"], fetch_times[first_all])
                                              for c in args.topk_codecs[1:]},
            "ratio": ratio(times["in-memory tensors"], times["Zarr cache (reader)"])}


def main(argv=None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--teachers", nargs="+", default=["quickstart", "large"], choices=TEACHERS)
    shape_arguments(p)
    p.add_argument("--student-dim", type=int, default=None,
                   help="the student's width (default the quickstart preset's, 128); a student distilled from a "
                        "0.5-8B teacher is 1024 wide or more, and its step then hides more of the reader's work")
    p.add_argument("--student-layers", type=int, default=None, help="the student's blocks (default the preset's)")
    p.add_argument("--rows", type=int, default=256, help="rows in the cache (256 = 16 chunks, 4 stay decoded)")
    p.add_argument("--batch", type=int, default=16, help="training batch = cache chunk (quickstart preset: 16)")
    p.add_argument("--steps", type=int, default=16, help="optimiser steps per timed pass (16: every chunk once)")
    p.add_argument("--topk-codecs", nargs="+", default=[TOPK_CODEC, "zstd"],
                   help=f"codecs of the cached top-k logits; training reads the first (default {TOPK_CODEC}), the "
                        "reader alone is timed on each")
    p.add_argument("--cache-layers", nargs="+", type=int, default=None,
                   help="the cached layers (default the preset's, [-1]); the student reconstructs the last and matches "
                        "the others, as the stage does, so training reads them all")
    p.add_argument("--logits", choices=["topk", "sampled"], default=None,
                   help="how the cached logits are chosen (cache.logits; default the preset's, topk)")
    p.add_argument("--root", default=None, help="artifact store root (default: a temporary directory)")
    p.set_defaults(repeats=5)
    args = p.parse_args(argv)
    device = setup(args)
    store = ArtifactStore(args.root or tempfile.mkdtemp(prefix="bench-read-"))
    results = []
    for kind in args.teachers:
        print(f"{kind}: cache of {args.rows} rows, {args.steps} steps x {args.repeats} rounds", flush=True)
        results.append(compare(kind, args, device, store))
    rows = [[r["teacher"], r["hidden_size"], r["student_dim"], r["batch"], r["tokens_per_s"]["in-memory tensors"],
             r["tokens_per_s"]["Zarr cache (reader)"], 1000 * r["fetch_s_per_batch"]["in-memory tensors"],
             1000 * r["fetch_s_per_batch"]["Zarr cache (reader)"], r["ratio"]["median"],
             f"{r['ratio']['min']:.3f}-{r['ratio']['max']:.3f}", "yes" if r["ratio"]["median"] >= TARGET else "no",
             1000 * median(r["fetch_s_per_batch_variants"][f"all arrays, top-k {args.topk_codecs[0]}"]),
             r["fetch_ratio_all_over_stage"]["median"],
             *(1000 * median(r["fetch_s_per_batch_variants"][f"all arrays, top-k {c}"]) for c in args.topk_codecs[1:]),
             *(r["fetch_ratio_other_topk_codecs"][c]["median"] for c in args.topk_codecs[1:])]
            for r in results]
    tables = {f"Superposition training step, batches from the cache / from memory (target >= {TARGET})": table(
        ["teacher (cached hidden)", "hidden", "student dim", "batch", "in-memory tok/s", "cache tok/s",
         "fetch ms/batch, memory", "fetch ms/batch, cache (the stage's arrays)", "cache / in-memory (median)",
         "range", "meets target", f"fetch ms/batch, every array (top-k {args.topk_codecs[0]})",
         "fetch, every array / the stage's",
         *(f"fetch ms/batch, every array (top-k {c})" for c in args.topk_codecs[1:]),
         *(f"fetch, top-k {c} / {args.topk_codecs[0]}" for c in args.topk_codecs[1:])], rows)}
    report("cache_read", args, device, tables, {"results": results})


if __name__ == "__main__":
    main()
