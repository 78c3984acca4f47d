"""The teacher-cache writer's CPU time per chunk: process CPU seconds (every thread: the producer's staging, the
writer threads, any library pool) from an open ``TeacherCacheWriter``'s first chunk to its close, divided by the
chunks, on the quickstart teacher's real outputs computed beforehand. Opening a writer is left out (once per cache).

On a CPU whose cores the teacher's forward already fills, this is what the cache stage costs over the teacher's
outputs (docs/RESULTS.md, "Teacher cache"). To compare two commits, run the same copy of this script in a worktree of each,
alternating.
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
from bench.common import median, parser, report, setup, table, teacher, token_rows
from distill.stages.teacher_cache import TeacherForward
from distill.teacher import resolve_layers
from storage import ArtifactStore
from storage.cache import TeacherCacheWriter
from storage.cache_spec import TOPK_CODEC


def main(argv=None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=128, help="rows per pass")
    p.add_argument("--batch", type=int, default=16, help="rows per chunk (quickstart preset: 16)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--writer-threads", type=int, nargs="+", default=[4, 1])
    p.set_defaults(repeats=7, threads=2)
    args = p.parse_args(argv)
    device = setup(args)
    model, info = teacher("quickstart", device, torch.float32)
    ids, mask = token_rows(args.rows, args.seq_len)
    layers = resolve_layers([-1], model.config.num_hidden_layers)
    forward = TeacherForward(model, layers, 32)
    chunks = [chunk_arrays(i, m, forward(i.to(device), m.to(device))) for i, m in split(ids, mask, args.batch)]
    spec = spec_for(model, args.rows, args.batch, args.seq_len, layers, dtype="float16", codec="zstd", topk=32,
                    topk_codec=TOPK_CODEC)
    store = ArtifactStore(tempfile.mkdtemp(prefix="bench-writer-cpu-"))
    ms_per_chunk: dict[int, list[float]] = {n: [] for n in args.writer_threads}
    for _ in range(args.repeats):
        for threads in args.writer_threads:  # interleaved: the machine's noise hits every variant alike
            path = f"w-{uuid.uuid4().hex[:8]}"
            writer = TeacherCacheWriter(store, path, spec, threads=threads)
            started = time.process_time()
            for chunk, arrays in enumerate(chunks):
                writer.write_chunk(chunk, arrays)
            writer.close()
            ms_per_chunk[threads].append(1e3 * (time.process_time() - started) / len(chunks))
            store.delete(path)
    rows = [[n, median(v), f"{min(v):.2f}-{max(v):.2f}"] for n, v in ms_per_chunk.items()]
    tables = {f"Writer CPU per {args.batch}-row chunk, quickstart teacher ({len(chunks)} chunks x {args.repeats})":
              table(["writer threads", "CPU ms per chunk (median)", "range"], rows)}
    report("writer_cpu", args, device, tables, {**info, "ms_per_chunk": ms_per_chunk, "chunks": len(chunks)})


if __name__ == "__main__":
    main()
