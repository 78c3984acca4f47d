"""Benchmark accuracy through lm-evaluation-harness on the quickstart: what the local task (or others) costs in the
evaluate stage, and the teacher's, naive ternary's and each student's accuracy.

Each flow runs twice through the pipeline's own flow functions: first with ``eval.lm_eval.tasks`` empty (the
preset as it is; finished stages are reused), then with the tasks, which reruns evaluate and export only (training
is cached). The second run's wall time, and the seconds lm_eval.json records for each model (the harness's wrapper,
its task loading and scoring), are the cost; the accuracies are the evaluate stage's table.

    .venv/bin/python -m bench.lm_eval_cost                                  # both flows, the local task, every example
    .venv/bin/python -m bench.lm_eval_cost --flows self-distill --set self_distill.steps=300 --limit 100
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/lm_eval_cost.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, machine, parser, report, setup, table  # noqa: E402

FLOWS = ("self-distill", "superposition-distill")


def main(argv=None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--config", default="quickstart")
    p.add_argument("--flows", nargs="+", default=list(FLOWS), choices=FLOWS)
    p.add_argument("--tasks", nargs="+", default=["configs/lm_eval/stdlib_next_line.yaml"])
    p.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of both runs")
    p.add_argument("--root", default=None, help="artifact root (default: the preset's, reusing make quickstart's)")
    p.set_defaults(threads=0)  # torch's default, as the quickstart runs
    args = p.parse_args(argv)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    device = setup(args)
    from flows import FLOWS as FLOW_FUNCTIONS

    base = dict(kv.split("=", 1) for kv in args.set) | ({"storage.root": args.root} if args.root else {})
    harness = {"eval.lm_eval.tasks": args.tasks, "eval.lm_eval.limit": args.limit}
    results, rows = {}, []
    for flow in args.flows:
        start = time.perf_counter()
        FLOW_FUNCTIONS[flow](config=args.config, overrides=base)
        without = time.perf_counter() - start
        start = time.perf_counter()
        result = FLOW_FUNCTIONS[flow](config=args.config, overrides={**base, **harness})
        with_harness = time.perf_counter() - start
        written = json.loads(Path(result["links"]["lm_eval.json"]).read_text())
        results[flow] = {"run_without_tasks_s": without, "run_with_tasks_s": with_harness,
                         "harness_seconds": written["seconds"], "table": written["table"],
                         "lm_eval_json": result["links"]["lm_eval.json"]}
        for row in written["table"]:
            rows.append([flow, row["task"], row["metric"], row["n"], row["teacher"], row["ptq_ternary"],
                         row["student"], f"{row['student_minus_teacher']:+.4f}"])
        for kind in ("wall", "cpu"):
            seconds = {model: s[kind] for model, s in written["seconds"].items()}
            rows.append([flow, f"{kind} seconds", "", "", seconds["teacher"], seconds["ptq_ternary"],
                         seconds["student"], f"total {sum(seconds.values()):.1f}"])
        rows.append([flow, "flow rerun (evaluate, export, publish) wall seconds", "", "", "", "", "",
                     f"{with_harness:.1f}"])
        tables = {"Benchmark accuracy (lm-evaluation-harness) on the quickstart": table(
            ["flow", "task", "metric", "n", "teacher", "naive ternary", "student", "student - teacher"], rows)}
        report("lm_eval_cost", args, device, tables, {"runs": results, "machine": machine(device)})


if __name__ == "__main__":
    main()
