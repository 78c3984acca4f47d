"""Command line: run a flow locally (on a temporary Prefect server, or the configured one), say what a run would
do, check what earlier runs wrote, or show the resolved configuration.

    python -m flows run both --config quickstart          # both flows, then one summary table
    python -m flows run superposition-distill --config quickstart --set train.steps=20
    python -m flows run self-distill --config configs/tinyllama.yaml --set self_distill.delta=lora:16
    python -m flows plan both --config quickstart         # each stage: reused, resumed or run (nothing runs)
    python -m flows verify both --config quickstart       # every finished stage against its checksums
    python -m flows verify both --config quickstart --repair   # ... and reopen what is damaged
    python -m flows config quickstart --set data.seq_len=64
"""

from __future__ import annotations

import argparse
import os
import sys

# The temporary Prefect server this command starts would send usage telemetry, and log an error every ten minutes
# where there is no network; a server of your own keeps its own setting.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import yaml

from distill.config import ConfigError, PipelineConfig, load_config, parse_overrides
from flows.user_errors import USER_ERRORS

FLOW_NAMES = ["superposition-distill", "self-distill"]


def summary_table(results: dict[str, dict]) -> str:
    """The headline numbers of one or both flows, as aligned text."""
    first_result = next(iter(results.values()))
    first = first_result["metrics"]
    rows = [("teacher perplexity", f"{first['teacher']['perplexity']:.3f}"),
            ("naive ternary (PTQ) perplexity", f"{first['ptq_ternary']['perplexity']:.3f}")]
    for row in first_result.get("lm_eval", []):  # eval.lm_eval.tasks: benchmark accuracy
        rows.append((f"{row['task']} {row['metric']}: teacher, naive ternary", f"{row['teacher']:.3f}, "
                                                                              f"{row['ptq_ternary']:.3f}"))
    for flow, result in results.items():
        m = result["metrics"]
        label = "self-distilled student" if flow == "self-distill" else "superposition student"
        rows += [(f"{label} perplexity", f"{m['student']['perplexity']:.3f}"),
                 (f"{label} KL to teacher", f"{m['student']['kl_to_teacher']:.4f}")]
        rows += [(f"{label} {row['task']} {row['metric']}", f"{row['student']:.3f}")
                 for row in result.get("lm_eval", [])]
        rows += [(f"{label} packed size", f"{m['packed_bytes'] / 2**20:.2f} MiB "
                                          f"({m['fp16_bytes'] / max(m['packed_bytes'], 1):.1f}x smaller than fp16)"),
                 (f"{label} report", result["links"]["report"])]
        gguf = result["export"].get("gguf")
        if gguf:
            rows.append((f"{label} llama.cpp file", f"{result['links']['student gguf']} ({gguf['bytes'] / 2**20:.2f} "
                                                   f"MiB, {gguf['qtype'].upper()})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


class _StderrLog:
    """The log ``plan_run`` writes to (Prefect's run logger in a flow): stderr, beside the table on stdout."""

    def info(self, message, *args):
        print(message % args, file=sys.stderr)

    warning = info


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Aligned columns; the last one left ragged."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]


def plan_table(config: str | PipelineConfig, overrides: dict, flows: list[str]) -> str:
    """Each stage of ``flows``: its fingerprint, what a run would do there now, and its artifact directory."""
    from distill.plan import plan_run, stage_states

    rows = [("flow", "stage", "fingerprint", "a run now", "artifacts")]
    roots = []
    for flow in flows:
        run, store = plan_run(flow, config, overrides, _StderrLog())
        states = stage_states(run, store)
        rows += [(flow, name, stage.fingerprint, states[name], stage.path) for name, stage in run.stages.items()]
        roots.append(f"{flow}: run {run.name} under {store.url()}")
    return "\n".join(roots + [""] + _table(rows))


def verify(config: str | PipelineConfig, overrides: dict, flows: list[str], repair: bool) -> tuple[str, bool]:
    """Every finished stage of ``flows`` checked against the checksums recorded when it was written; with ``repair``
    what is damaged is reopened, so that the next run redoes only that. The table, and whether damage was found."""
    from distill.plan import plan_run
    from distill.stage import verify_stage
    from distill.stages import STAGES

    rows, seen, damaged = [("flow", "stage", "state", "artifacts")], set(), False
    for flow in flows:
        run, _ = plan_run(flow, config, overrides, _StderrLog())
        for name, stage in run.stages.items():
            if stage.path in seen:  # tokenize and the teacher cache are shared by both flows
                continue
            seen.add(stage.path)
            state, problems = verify_stage(STAGES[name], run.context(name), repair)
            if problems:
                damaged = True
                state += f" ({'; '.join(problems)})" + ("; reopened: the next run redoes it" if repair else "")
            rows.append((flow, name, state, stage.path))
    return "\n".join(_table([(f, s, p, st) for f, s, st, p in rows])), damaged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a flow end to end (finished stages are reused)")
    plan = sub.add_parser("plan", help="say what a run would reuse, resume or run, without running anything")
    check = sub.add_parser("verify", help="check every finished stage against its checksums (--repair: reopen "
                                          "what is damaged, for the next run to redo)")
    check.add_argument("--repair", action="store_true", help="reopen damaged stages (and teacher-cache chunks)")
    for p in (run, plan, check):
        p.add_argument("flow", choices=[*FLOW_NAMES, "both"])
    show = sub.add_parser("config", help="print the resolved configuration")
    for p in (run, plan, check, show):
        p.add_argument("--config", "-c", help="preset name in configs/ or a YAML path (default: quickstart)")
        p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field, e.g. --set train.steps=20 (repeatable)")
    show.add_argument("name", nargs="?", help="preset name or YAML path (same as --config)")
    args = parser.parse_args(argv)
    try:
        name = getattr(args, "name", None)
        if name and args.config and name != args.config:
            raise ConfigError(f"two configurations given, {name!r} and --config {args.config!r}: give one")
        cfg = load_config(name or args.config or "quickstart", parse_overrides(args.set))  # the one validation
        if args.command == "config":
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
            return 0
        names = FLOW_NAMES if args.flow == "both" else [args.flow]
        if args.command == "plan":  # no Prefect server: nothing runs
            print(plan_table(cfg, {}, names))
            return 0
        if args.command == "verify":
            table, damaged = verify(cfg, {}, names, args.repair)
            print(table)
            return 1 if damaged and not args.repair else 0
        results = run_flows(cfg, names)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside training (which checkpoints and stops with TrainingInterrupted)
        print("error: interrupted (Ctrl-C); rerun the same command to go on: finished stages, cache chunks and "
              "checkpoints are reused", file=sys.stderr)
        return 130
    print(f"\nfinished: {', '.join(r['run'] for r in results.values())}\n")
    print(summary_table(results))
    return 0


def run_flows(cfg: PipelineConfig, names: list[str]) -> dict[str, dict]:
    """Each flow on ``cfg``, on the configured Prefect server or a temporary one that stops with this command."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import FLOWS
    from flows.temporary_server import send_what_prefect_holds, start_temporary_server

    api_url = start_temporary_server()
    if not api_url:
        return {name: FLOWS[name](config=cfg) for name in names}
    with temporary_settings({PREFECT_API_URL: api_url}):
        try:
            return {name: FLOWS[name](config=cfg) for name in names}
        finally:
            send_what_prefect_holds()


if __name__ == "__main__":
    sys.exit(main())
