"""Teacher caching: what the cache stage costs over the bare teacher forward pass, and its bytes per token on disk.

Throughput ratio: the cache stage's path (``distill.teacher.TeacherForward`` + ``TeacherCacheWriter`` writing the
chosen layers and top-k logits into a real local ``ArtifactStore``, from the open writer's first chunk to its close;
opening a cache, paid once per cache, is reported apart) against the bare teacher forward (without a KV cache, as
the cache stage runs it; transformers' default forward, which builds one, is timed beside it) on the same batches,
interleaved. A third variant, the teacher outputs without writing, separates the cost of asking for hidden states
and top-k from the cost of the writer (and beside it the top-k of the model's whole logits, as the stage took it
before the block-wise top-k); a fourth, the writer alone on outputs computed beforehand, says how fast the writer
can store (the cache stage is bound by the slower of the forward pass and the writer). Target: ratio >= 0.90. The
cache stage and the writer alone are also timed with other top-k codecs (``--topk-codecs``; by default zstd beside
the stage's bit-shuffled LZ4) and writer thread counts.

Sizes: the teacher's real outputs written once per storage dtype and codec; bytes per token of each cached layer
and of top-k logits (values fp16 + indices int32) at k = 16, 64, 128, next to ``torch.save`` of the same tensors.
"""

from __future__ import annotations

import functools
import sys
import tempfile
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/cache_overhead.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import (TEACHERS, compute_dtype, interleave, median, parser, ratio, report, setup, shape_arguments,
                          table, teacher, token_rows)
from distill.stages.teacher_cache import TeacherForward
from distill.teacher import resolve_layers
from storage import ArtifactStore
from storage.cache import TeacherCacheSpec, TeacherCacheWriter
from storage.cache_spec import TOPK_CODEC

TARGET = 0.90
SIZE_DTYPES = ("float32", "float16", "bfloat16")
SIZE_CODECS = ("none", "zstd", "blosc", TOPK_CODEC)
TOPKS = (16, 64, 128)


def split(ids: torch.Tensor, mask: torch.Tensor, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(ids[i:i + batch], mask[i:i + batch]) for i in range(0, len(ids), batch)]


def chunk_arrays(ids: torch.Tensor, mask: torch.Tensor, outputs: dict) -> dict:
    """What the cache stage hands the writer for one chunk (distill/teacher_cache.py)."""
    return {"input_ids": ids, "attention_mask": mask, **outputs}


def spec_for(model, rows: int, batch: int, seq_len: int, layers: list[int], **kwargs) -> TeacherCacheSpec:
    return TeacherCacheSpec(num_samples=rows, seq_len=seq_len, layers=layers, hidden_size=model.config.hidden_size,
                            chunk_size=batch, fingerprint="bench", **kwargs)


def throughput(model, info: dict, args, device, store: ArtifactStore, rows: int) -> dict:
    ids, mask = token_rows(rows, args.seq_len)
    batches = split(ids, mask, args.batch)
    layers = resolve_layers(args.layers, model.config.num_hidden_layers)
    forward = TeacherForward(model, layers, args.topk)
    full_logits = TeacherForward(model, layers, args.topk)
    full_logits.fused = False  # the model's own forward and the top-k of its whole logits: the stage before blocks
    specs = {codec: spec_for(model, rows, args.batch, args.seq_len, layers, dtype=args.dtype, codec=args.codec,
                             topk=args.topk, topk_codec=codec) for codec in args.topk_codecs}

    @torch.no_grad()
    def bare(use_cache: bool = False):  # without a KV cache, as TeacherForward runs the teacher
        for i, m in batches:
            model(input_ids=i.to(device), attention_mask=m.to(device), use_cache=use_cache)

    def outputs_only(run=forward):
        for i, m in batches:
            chunk_arrays(i, m, run(i.to(device), m.to(device)))

    opening: list[float] = []  # seconds to open a writer (its lock, group and arrays), timed apart

    def write(threads: int, chunks, topk_codec: str = args.topk_codecs[0]) -> float:
        """Seconds from an open writer to its close. Opening is paid once per cache (300 chunks in the quickstart),
        not once per this pass's few chunks, so it is left out of the ratio and reported on its own."""
        path = f"overhead-{uuid.uuid4().hex[:8]}"
        opened = time.perf_counter()
        with TeacherCacheWriter(store, path, specs[topk_codec], threads=threads) as writer:
            start = time.perf_counter()
            opening.append(start - opened)
            for chunk, arrays in enumerate(chunks):
                writer.write_chunk(chunk, arrays)
        elapsed = time.perf_counter() - start
        store.delete(path)
        return elapsed

    def cache_stage(threads: int = args.writer_threads[0], topk_codec: str = args.topk_codecs[0]) -> float:
        # each chunk's forward pass runs when the loop asks for its arrays
        return write(threads, (chunk_arrays(i, m, forward(i.to(device), m.to(device))) for i, m in batches), topk_codec)

    # the teacher's outputs computed once, left where they were computed, then only written: what the writer alone
    # sustains (on a GPU, device-to-host copies included)
    computed = [chunk_arrays(i, m, forward(i.to(device), m.to(device))) for i, m in batches]

    def writer_alone(topk_codec: str = args.topk_codecs[0]) -> float:
        return write(args.writer_threads[0], computed, topk_codec)

    # the first entries of --writer-threads and --topk-codecs are "the cache stage"; the others are compared beside it
    stages = {stage_name(n, args): functools.partial(cache_stage, n) for n in args.writer_threads}
    stages |= {f"cache stage, top-k {c}": functools.partial(cache_stage, topk_codec=c) for c in args.topk_codecs[1:]}
    writers = {"writer alone": writer_alone}
    writers |= {f"writer alone, top-k {c}": functools.partial(writer_alone, c) for c in args.topk_codecs[1:]}
    times = interleave({"bare forward": bare, "bare forward, KV cache": functools.partial(bare, True),
                        "teacher outputs": outputs_only,
                        "teacher outputs, full logits": functools.partial(outputs_only, full_logits),
                        **stages, **writers}, args.repeats, device)
    tokens = int(mask.sum())
    return {**info, "rows": rows, "tokens": tokens, "chunks": len(batches), "layers": layers, "topk": args.topk,
            "dtype": args.dtype, "codec": args.codec, "topk_codecs": args.topk_codecs,
            "writer_threads": args.writer_threads, "writer_open_ms": 1e3 * median(opening),
            "tokens_per_s": {name: tokens / median(t) for name, t in times.items()},
            "ratio_cache_over_bare": ratio(times["bare forward"], times["cache stage"]),
            "topk_fused": forward.fused,
            "ratio_outputs_over_bare": ratio(times["bare forward"], times["teacher outputs"]),
            # the top-k of the model's whole logits: how the stage took it before the blocks
            "ratio_full_logits_outputs_over_bare": ratio(times["bare forward"], times["teacher outputs, full logits"]),
            # above 1: the block-wise top-k is faster than the top-k of the whole logits
            "ratio_outputs_over_full_logits": ratio(times["teacher outputs, full logits"], times["teacher outputs"]),
            # what transformers' default (use_cache=True) costs: the forward the cache stage ran before
            "ratio_kv_cache_over_bare": ratio(times["bare forward"], times["bare forward, KV cache"]),
            "ratio_other_writers_over_bare": {name: ratio(times["bare forward"], times[name])
                                              for name in list(stages)[1:]},
            # the writer's speed with the stage's top-k codec / with another: above 1, the stage's is faster
            "ratio_writer_alone_other_topk_codecs": {c: ratio(times[f"writer alone, top-k {c}"], times["writer alone"])
                                                     for c in args.topk_codecs[1:]},
            "seconds": times}


def stage_name(threads: int, args) -> str:
    return "cache stage" if threads == args.writer_threads[0] else f"cache stage, {threads} writer thread(s)"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def sizes(model, info: dict, args, device, store: ArtifactStore) -> dict:
    """Bytes per token of each cached layer and of top-k logits, per storage dtype and codec."""
    ids, mask = token_rows(args.size_rows, args.seq_len)
    batches = split(ids, mask, args.batch)
    n = model.config.num_hidden_layers
    layers = [n // 2, n]
    forward = TeacherForward(model, layers, max(TOPKS))
    chunks = [chunk_arrays(i, m, forward(i.to(device), m.to(device))) for i, m in batches]
    tokens = args.size_rows * args.seq_len

    def write(path: str, spec: TeacherCacheSpec, topk: int) -> Path:
        names = spec.arrays()
        with TeacherCacheWriter(store, path, spec) as writer:
            for c, arrays in enumerate(chunks):
                writer.write_chunk(c, {k: v[..., :topk] if k.startswith("topk_") else v
                                       for k, v in arrays.items() if k in names})
        return store.local_path(f"{path}/data.zarr")

    def saved_bytes(tensors) -> int:
        with tempfile.NamedTemporaryFile(dir=store.local_path()) as f:
            torch.save(tensors, f.name)
            return Path(f.name).stat().st_size

    hidden = {f"layer {i}": {} for i in layers}
    for dtype in SIZE_DTYPES:
        for codec in SIZE_CODECS:
            path = f"sizes-{dtype}-{codec}"
            group = write(path, spec_for(model, args.size_rows, args.batch, args.seq_len, layers, dtype=dtype,
                                         codec=codec), 0)
            for i in layers:
                hidden[f"layer {i}"][f"{dtype} {codec}"] = dir_bytes(group / f"hidden/layer_{i}") / tokens
            store.delete(path)
    for i in layers:
        stacked = torch.cat([c[f"hidden/layer_{i}"] for c in chunks]).half().contiguous()
        hidden[f"layer {i}"]["torch.save fp16"] = saved_bytes(stacked) / tokens
    topk = {}
    for k in TOPKS:
        topk[k] = {}
        for codec in SIZE_CODECS:
            path = f"sizes-topk{k}-{codec}"
            group = write(path, spec_for(model, args.size_rows, args.batch, args.seq_len, [n], dtype="float16",
                                         codec=codec, topk=k, topk_codec=codec), k)
            topk[k][codec] = sum(dir_bytes(group / a) for a in ("topk_values", "topk_indices")) / tokens
            store.delete(path)
        values = torch.cat([c["topk_values"][..., :k] for c in chunks]).contiguous()
        indices = torch.cat([c["topk_indices"][..., :k] for c in chunks]).contiguous()
        topk[k]["torch.save"] = saved_bytes({"values": values, "indices": indices}) / tokens
    return {**info, "tokens": tokens, "hidden_bytes_per_token": hidden, "topk_bytes_per_token": topk}


def main(argv=None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--teachers", nargs="+", default=["quickstart", "large"], choices=TEACHERS)
    shape_arguments(p)
    p.add_argument("--rows", type=int, default=128, help="rows per timed pass, quickstart teacher")
    p.add_argument("--large-rows", type=int, default=48, help="rows per timed pass, every other teacher")
    p.add_argument("--size-rows", type=int, default=64, help="rows written for the bytes-per-token tables")
    p.add_argument("--batch", type=int, default=16, help="teacher batch = cache chunk (quickstart preset: 16)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layers", type=int, nargs="+", default=[-1], help="cached hidden states (quickstart: -1)")
    p.add_argument("--topk", type=int, default=32, help="cached top-k logits (quickstart preset: 32)")
    p.add_argument("--dtype", default="float16", help="cache dtype (quickstart preset: float16)")
    p.add_argument("--codec", default="zstd", help="cache codec of the hidden states (default zstd)")
    p.add_argument("--topk-codecs", nargs="+", default=[TOPK_CODEC, "zstd"],
                   help=f"codec of the top-k logits (the first, default {TOPK_CODEC}, is the stage's); the others "
                        "are timed beside it")
    p.add_argument("--root", default=None, help="artifact store root (default: a temporary directory)")
    p.add_argument("--no-sizes", action="store_true", help="throughput only (skip the bytes-per-token tables)")
    p.add_argument("--writer-threads", type=int, nargs="+", default=[4, 1],
                   help="writer threads of the cache stage (the first is the stage's default); the others are timed "
                        "beside it")
    # All cores by default: the writer thread's compression must then compete with the forward pass for the CPU,
    # as it does in a real run (with one torch thread it would run on an otherwise idle core).
    p.set_defaults(repeats=3, threads=0)
    args = p.parse_args(argv)
    device = setup(args)
    root = args.root or tempfile.mkdtemp(prefix="bench-cache-")
    store = ArtifactStore(root)
    speed, size = [], []
    for kind in args.teachers:
        model, info = teacher(kind, device, compute_dtype(device), layers=args.shape_layers)
        rows = args.rows if kind == "quickstart" else args.large_rows
        print(f"{kind}: {info['source']}, {info['parameters'] / 1e6:.1f}M parameters; timing {rows} rows x "
              f"{args.repeats} rounds", flush=True)
        speed.append(throughput(model, info, args, device, store, rows))
        if not args.no_sizes:
            size.append(sizes(model, info, args, device, store))
        del model

    speed_rows = [[r["teacher"], r["source"], r["hidden_size"], r["tokens"], r["tokens_per_s"]["bare forward"],
                   r["tokens_per_s"]["cache stage"], r["tokens_per_s"]["writer alone"],
                   r["writer_open_ms"], r["ratio_kv_cache_over_bare"]["median"],
                   r["ratio_full_logits_outputs_over_bare"]["median"],
                   r["ratio_outputs_over_bare"]["median"], r["ratio_outputs_over_full_logits"]["median"],
                   r["ratio_cache_over_bare"]["median"],
                   f"{r['ratio_cache_over_bare']['min']:.3f}-{r['ratio_cache_over_bare']['max']:.3f}",
                   "yes" if r["ratio_cache_over_bare"]["median"] >= TARGET else "no",
                   *(r["ratio_other_writers_over_bare"][stage_name(n, args)]["median"] for n in args.writer_threads[1:]),
                   *(r["ratio_other_writers_over_bare"][f"cache stage, top-k {c}"]["median"] for c in args.topk_codecs[1:]),
                   *(r["tokens_per_s"][f"writer alone, top-k {c}"] for c in args.topk_codecs[1:]),
                   *(r["ratio_writer_alone_other_topk_codecs"][c]["median"] for c in args.topk_codecs[1:])]
                  for r in speed]
    tables = {"Cache stage throughput / bare teacher forward (target >= 0.90)": table(
        ["teacher", "weights", "hidden", "tokens/pass", "bare tok/s", "cache tok/s", "writer alone tok/s",
         "writer open (ms, once per cache)", "with KV cache / bare", "teacher outputs, full logits / bare",
         "teacher outputs / bare",
         "teacher outputs, block-wise top-k / full logits",
         f"cache / bare (median), {args.writer_threads[0]} writer threads", "range", "meets target",
         *(f"cache / bare, {n} writer thread(s)" for n in args.writer_threads[1:]),
         *(f"cache / bare, top-k {c}" for c in args.topk_codecs[1:]),
         *(f"writer alone tok/s, top-k {c}" for c in args.topk_codecs[1:]),
         *(f"writer alone, top-k {args.topk_codecs[0]} / {c}" for c in args.topk_codecs[1:])], speed_rows)}
    columns = [f"{d} {c}" for d in SIZE_DTYPES for c in SIZE_CODECS] + ["torch.save fp16"]
    for s in size:
        tables[f"Bytes per token per cached layer, {s['teacher']} teacher (hidden {s['hidden_size']})"] = table(
            ["layer", *columns], [[name, *(v[c] for c in columns)] for name, v in s["hidden_bytes_per_token"].items()])
        tables[f"Bytes per token of top-k logits (fp16 values + int32 indices), {s['teacher']} teacher"] = table(
            ["k", *SIZE_CODECS, "torch.save"],
            [[k, *(v[c] for c in (*SIZE_CODECS, "torch.save"))] for k, v in s["topk_bytes_per_token"].items()])
    report("cache_overhead", args, device, tables, {"throughput": speed, "sizes": size, "store_root": root})


if __name__ == "__main__":
    main()
