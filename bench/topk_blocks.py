"""The cache stage's block-wise top-k: output embedding + top-k over a batch's rows, block by block, against the top-k
of the whole logits, at the vocabulary sizes real teachers have.

Each block streams the whole output embedding again; small blocks keep their logits in a CPU's caches. Random
weights and hidden states (speed does not depend on their values); ``rows`` is a batch's positions (16 x 128 at
the quickstart preset). The blocks the stage picks (``distill.teacher.topk_block_rows``) are marked.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/topk_blocks.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from bench.common import compute_dtype, interleave, parser, ratio, report, setup, table
from distill.stages.teacher_cache import topk_block_rows

# (vocabulary, hidden size): the quickstart teacher's head, a Llama-2-sized one, a Qwen2.5-1.5B-sized one
HEADS = [(4096, 256), (32000, 2048), (151936, 1536)]


def measure(vocab: int, hidden: int, args, device) -> dict:
    dtype = compute_dtype(device)
    torch.manual_seed(0)
    head = nn.Linear(hidden, vocab, bias=False).to(device, dtype)
    states = torch.randn(args.rows, hidden, device=device, dtype=dtype)
    chosen = topk_block_rows(head.weight)
    sizes = sorted({*args.block_rows, chosen} - {0})

    @torch.no_grad()
    def blocks(rows: int) -> None:
        for part in states.split(rows):
            head(part).topk(args.topk, dim=-1)

    @torch.no_grad()
    def whole() -> None:
        head(states).topk(args.topk, dim=-1)

    variants = {"whole logits": whole, **{f"{r} rows": (lambda r=r: blocks(r)) for r in sizes}}
    times = interleave(variants, args.repeats, device)
    return {"vocab": vocab, "hidden": hidden, "rows": args.rows, "topk": args.topk, "chosen_block_rows": chosen,
            "head_mib": head.weight.numel() * head.weight.element_size() / 2**20,
            # above 1: the blocks are faster than the whole logits
            "speed_over_whole": {r: ratio(times["whole logits"], times[f"{r} rows"]) for r in sizes},
            "seconds": times}


def main(argv=None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2048, help="positions per batch (quickstart preset: 16 x 128)")
    p.add_argument("--topk", type=int, default=32, help="k (quickstart preset: 32)")
    p.add_argument("--block-rows", type=int, nargs="+", default=[16, 64, 256, 512, 1024],
                   help="block sizes timed beside the stage's own choice")
    p.add_argument("--heads", type=int, nargs="+", default=None,
                   help="vocabulary sizes (default: 4096 32000 151936, with their hidden sizes)")
    p.set_defaults(repeats=5, threads=0)  # all cores, as the cache stage runs
    args = p.parse_args(argv)
    device = setup(args)
    heads = [h for h in HEADS if args.heads is None or h[0] in args.heads]
    results = []
    for vocab, hidden in heads:
        print(f"vocabulary {vocab:,} x hidden {hidden}: {args.rows} rows x {args.repeats} rounds", flush=True)
        results.append(measure(vocab, hidden, args, device))
    rows = [[r["vocab"], r["hidden"], r["head_mib"], int(size), "yes" if int(size) == r["chosen_block_rows"] else "",
             s["median"], f"{s['min']:.2f}-{s['max']:.2f}"]
            for r in results for size, s in r["speed_over_whole"].items()]
    tables = {"Block-wise top-k: speed / the top-k of the whole logits (above 1: the blocks are faster)": table(
        ["vocabulary", "hidden", "head MiB", "rows per block", "the stage's choice", "speed / whole (median)", "range"],
        rows)}
    report("topk_blocks", args, device, tables, {"heads": results})


if __name__ == "__main__":
    main()
