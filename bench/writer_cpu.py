"""The teacher-cache writer's cost per chunk: process CPU seconds (every thread: the producer's staging, the writer
threads, any library pool) and wall seconds, from an open ``TeacherCacheWriter``'s first chunk to its close, divided
by the chunks, on a teacher's real outputs computed beforehand. Opening a writer is left out (once per cache).

On a CPU whose cores the teacher's forward already fills, the CPU time is what the cache stage costs over the
teacher's outputs; where a GPU computes the outputs, the wall time per chunk says whether the writer keeps pace
(docs/RESULTS.md, "Teacher cache"). Variants run interleaved in one process: writer thread counts, and the writer's
earlier choices (``--variants``): sha256 instead of CRC-32C record checksums, a chunk's objects written one after
another instead of concurrently. With a model-shaped teacher (``--teacher qwen2.5-1.5b-shape --shape-layers 1``) the
outputs of ``--distinct-chunks`` chunks are computed and written over and over (the writer's cost does not depend on
which chunk it writes; the 150k-token head makes each forward slow on a CPU).
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/writer_cpu.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.cache_overhead import chunk_arrays, spec_for, split
from bench.common import TEACHERS, median, parser, ratio, report, setup, shape_arguments, table, teacher, token_rows
from distill.stages.teacher_cache import TeacherForward
from distill.teacher import resolve_layers
from storage import ArtifactStore
from storage.cache import TeacherCacheWriter
from storage.cache_spec import TOPK_CODEC

# name -> TeacherCacheWriter options; "current" is the writer's defaults
VARIANTS = {"current": {}, "sha256": {"checksum": "sha256"}, "sequential writes": {"concurrent_writes": False},
            "before (sha256, sequential)": {"checksum": "sha256", "concurrent_writes": False}}


def main(argv=None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="quickstart", choices=TEACHERS)
    shape_arguments(p)
    p.add_argument("--rows", type=int, default=128, help="rows per pass")
    p.add_argument("--batch", type=int, default=16, help="rows per chunk (quickstart preset: 16)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layers", type=int, nargs="+", default=[-1], help="cached hidden states")
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--distinct-chunks", type=int, default=None,
                   help="compute this many chunks' outputs and write them in turn (default: every chunk's own)")
    p.add_argument("--writer-threads", type=int, nargs="+", default=[4, 1])
    p.add_argument("--variants", nargs="+", default=["current"], choices=list(VARIANTS),
                   help="writer options, each timed at every --writer-threads count")
    p.add_argument("--root", default=None, help="artifact store root (default: a temporary directory); the disk "
                                                "decides what an fsync costs")
    p.set_defaults(repeats=7, threads=2)
    args = p.parse_args(argv)
    device = setup(args)
    model, info = teacher(args.teacher, device, torch.float32, layers=args.shape_layers)
    ids, mask = token_rows(args.rows, args.seq_len)
    layers = resolve_layers(args.layers, model.config.num_hidden_layers)
    forward = TeacherForward(model, layers, args.topk)
    batches = split(ids, mask, args.batch)
    distinct = len(batches) if args.distinct_chunks is None else min(args.distinct_chunks, len(batches))
    computed = [chunk_arrays(i, m, forward(i.to(device), m.to(device))) for i, m in batches[:distinct]]
    # chunk c holds the outputs of batch c % distinct, with chunk c's own tokens (the records' token counts)
    chunks = [{**computed[c % distinct], "input_ids": i, "attention_mask": m} for c, (i, m) in enumerate(batches)]
    del model, forward
    spec = spec_for(info_model(info), args.rows, args.batch, args.seq_len, layers, dtype="float16", codec="zstd",
                    topk=args.topk, topk_codec=TOPK_CODEC)
    store = ArtifactStore(args.root or tempfile.mkdtemp(prefix="bench-writer-cpu-"))
    names = [(v, n) for v in args.variants for n in args.writer_threads]
    cpu_ms: dict[tuple, list[float]] = {k: [] for k in names}
    wall_ms: dict[tuple, list[float]] = {k: [] for k in names}
    for r in range(args.repeats):
        for variant, threads in names if r % 2 == 0 else reversed(names):  # interleaved, alternating order
            path = f"w-{uuid.uuid4().hex[:8]}"
            writer = TeacherCacheWriter(store, path, spec, threads=threads, **VARIANTS[variant])
            cpu, wall = time.process_time(), time.perf_counter()
            for chunk, arrays in enumerate(chunks):
                writer.write_chunk(chunk, arrays)
            writer.close()
            cpu_ms[variant, threads].append(1e3 * (time.process_time() - cpu) / len(chunks))
            wall_ms[variant, threads].append(1e3 * (time.perf_counter() - wall) / len(chunks))
            store.delete(path)
    first = args.variants[0]
    rows = [[v, n, median(cpu_ms[v, n]), f"{min(cpu_ms[v, n]):.2f}-{max(cpu_ms[v, n]):.2f}", median(wall_ms[v, n]),
             f"{min(wall_ms[v, n]):.2f}-{max(wall_ms[v, n]):.2f}",
             ratio(cpu_ms[v, n], cpu_ms[first, n])["median"], ratio(wall_ms[v, n], wall_ms[first, n])["median"]]
            for v, n in names]
    title = (f"Writer per {args.batch}-row chunk, {args.teacher} teacher (hidden {info['hidden_size']}, "
             f"{len(layers)} cached layer(s), top-{args.topk}; {len(chunks)} chunks x {args.repeats})")
    tables = {title: table(["variant", "writer threads", "CPU ms per chunk (median)", "range",
                            "wall ms per chunk (median)", "range", f"CPU / {first}", f"wall / {first}"], rows)}
    key = lambda v, n: f"{v}, {n} thread(s)"  # noqa: E731
    report("writer_cpu", args, device, tables, {
        **info, "cached_layers": layers, "chunks": len(chunks), "distinct_chunks": distinct,
        "cpu_ms_per_chunk": {key(v, n): t for (v, n), t in cpu_ms.items()},
        "wall_ms_per_chunk": {key(v, n): t for (v, n), t in wall_ms.items()},
        # per round, this variant / the first at the same thread count: below 1, this one is cheaper
        "cpu_ratio": {key(v, n): ratio(cpu_ms[v, n], cpu_ms[first, n]) for v, n in names},
        "wall_ratio": {key(v, n): ratio(wall_ms[v, n], wall_ms[first, n]) for v, n in names}})


def info_model(info: dict):
    """What ``spec_for`` reads of a model: its config's hidden size."""
    from types import SimpleNamespace

    return SimpleNamespace(config=SimpleNamespace(hidden_size=info["hidden_size"]))


if __name__ == "__main__":
    main()
