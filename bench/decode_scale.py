"""Does the scale of the decompressor's output handicap a superposition student decoded through the teacher's head?

The reconstruction loss is a cosine, so it leaves the norm of the decompressor's output free, while the teacher's
last hidden state (after its final RMSNorm) has a near-constant norm. This script takes a superposition run that
``bench.quality`` finished (the preset, ``--seed``), reports both norms on the held-out rows, and evaluates the
student through the teacher's head as it is and with every output rescaled to unit length times a multiple of the
teacher's mean norm.

    .venv/bin/python -m bench.decode_scale        # after: python -m bench.quality --groups superposition
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/decode_scale.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import REPO, parser, report, setup, table  # noqa: E402

SCALES = (0.5, 0.75, 1.0, 1.5)  # multiples of the teacher's mean norm


def main(argv=None) -> None:
    from distill.config import load_config
    from distill.metrics import Output, compare_to_teacher
    from distill.plan import make_plan, open_store, preflight
    from distill.rows import token_rows
    from distill.stage import finished
    from distill.stages import STAGES
    from distill.stages.lm_head import load_final_student
    from distill.stages.self_distill import dual_forward, load_dual
    from distill.teacher import Teacher

    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(REPO / "artifacts" / "quality"), help="bench.quality's artifact root")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = setup(args)
    cfg = load_config("quickstart", {"storage.root": args.root, "name": "quality", "seed": args.seed})
    plan = make_plan(cfg, "superposition-distill", preflight(cfg, "superposition-distill"))
    store = open_store(cfg)
    head_manifest = finished(STAGES["lm_head"], store, plan.stages["lm_head"].path)
    if head_manifest is None:
        sys.exit(f"no finished superposition run under {args.root} for seed {args.seed}: run "
                 f"`python -m bench.quality --groups superposition --superposition-seeds {args.seed}` first")
    small, projector = load_final_student(cfg, store, head_manifest)
    small.to(device)
    projector.to(device)
    dual = load_dual(cfg, Teacher(cfg.teacher), device)
    head = dual.model.get_output_embeddings()
    tokens = finished(STAGES["tokenize"], store, plan.stages["tokenize"].path)
    batches = [(b["input_ids"].to(device), b["attention_mask"].to(device))
               for b in token_rows(store, tokens, "eval").batches(cfg.eval.batch_size, limit=cfg.eval.max_rows)]

    def predicted(ids, mask):
        return projector(small(ids, mask, compute_logits=False).last_hidden)

    with torch.no_grad():
        norms = {"teacher": [], "decompressor": []}
        for ids, mask in batches:
            with dual.teacher():
                hidden = dual.model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                    use_cache=False).hidden_states[-1]
            norms["teacher"].append(hidden.norm(dim=-1)[mask.bool()])
            norms["decompressor"].append(predicted(ids, mask).norm(dim=-1)[mask.bool()])
        norms = {k: torch.cat(v) for k, v in norms.items()}
        mean_norm = norms["teacher"].mean()

        def through_head(scale: float | None):
            def forward(ids, mask):
                out = predicted(ids, mask)
                if scale is not None:
                    out = out / out.norm(dim=-1, keepdim=True) * (scale * mean_norm)
                return Output(head(out.to(head.weight.dtype)))
            return forward

        candidates = {"as trained": through_head(None), **{f"{s}x the teacher's mean norm": through_head(s)
                                                           for s in SCALES}}
        results = compare_to_teacher(dual_forward(dual, dual.teacher, []), candidates, iter(batches))

    norm_rows = [[name, float(v.mean()), float(v.std())] for name, v in norms.items()]
    rows = [[name, results[name]["perplexity"], results[name]["kl_to_teacher"], results[name]["top1_agreement"]]
            for name in candidates]
    tables = {"Per-token norm of the last hidden state, held-out rows": table(["states", "mean", "std"], norm_rows),
              f"Superposition student (seed {args.seed}) through the teacher's head, its outputs rescaled": table(
                  ["decompressor output", "perplexity", "KL(teacher ‖ ·)", "top-1 agreement"], rows)}
    report("decode_scale", args, device, tables, {"norms": {r[0]: r[1:] for r in norm_rows}, "results": results})


if __name__ == "__main__":
    main()
