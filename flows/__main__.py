"""Command line: run a flow locally (on Prefect's embedded default or the configured server), say what a run
would do, or show the resolved configuration.

    python -m flows run both --config quickstart          # both flows, then one summary table
    python -m flows run superposition-distill --config quickstart --set train.steps=20
    python -m flows run self-distill --config configs/tinyllama.yaml --set self_distill.delta=lora:16
    python -m flows plan both --config quickstart         # each stage: reused, resumed or run (nothing runs)
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

from distill.config import ConfigError, load_config
from flows.user_errors import USER_ERRORS


def parse_sets(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.steps=20")
        overrides[key.strip()] = value
    return overrides


def summary_table(results: dict[str, dict]) -> str:
    """The headline numbers of one or both flows, as aligned text."""
    first = next(iter(results.values()))["metrics"]
    rows = [("teacher perplexity", f"{first['teacher']['perplexity']:.3f}"),
            ("naive ternary (PTQ) perplexity", f"{first['ptq_ternary']['perplexity']:.3f}")]
    for flow, result in results.items():
        m = result["metrics"]
        label = "self-distilled student" if flow == "self-distill" else "superposition student"
        rows += [(f"{label} perplexity", f"{m['student']['perplexity']:.3f}"),
                 (f"{label} KL to teacher", f"{m['student']['kl_to_teacher']:.4f}"),
                 (f"{label} packed size", f"{m['packed_bytes'] / 2**20:.2f} MiB "
                                          f"({m['fp16_bytes'] / max(m['packed_bytes'], 1):.1f}x smaller than fp16)"),
                 (f"{label} report", result["links"]["report"])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


class _StderrLog:
    """The log ``plan_run`` writes to (Prefect's run logger in a flow): stderr, beside the plan on stdout."""

    def info(self, message, *args):
        print(message % args, file=sys.stderr)

    warning = info


def plan_table(config: str, overrides: dict, flows: list[str]) -> str:
    """Each stage of ``flows``: its fingerprint, what a run would do there now, and its artifact directory."""
    from distill.plan import stage_states
    from flows.prepare import plan_run

    rows = [("flow", "stage", "fingerprint", "a run now", "artifacts")]
    roots = []
    for flow in flows:
        cfg, store, plan = plan_run(flow, config, overrides, _StderrLog())
        states = stage_states(cfg, flow, store, plan)
        rows += [(flow, name, plan[name]["fingerprint"], state, plan[name]["path"]) for name, state in states.items()]
        roots.append(f"{flow}: run {plan['run']['name']} under {store.url()}")
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)) + "  " + row[4] for row in rows]
    return "\n".join(roots + [""] + lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a flow end to end (finished stages are reused)")
    plan = sub.add_parser("plan", help="say what a run would reuse, resume or run, without running anything")
    for p in (run, plan):
        p.add_argument("flow", choices=["superposition-distill", "self-distill", "both"])
    show = sub.add_parser("config", help="print the resolved configuration")
    for p in (run, plan, show):
        p.add_argument("--config", "-c", help="preset name in configs/ or a YAML path (default: quickstart)")
        p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field, e.g. --set train.steps=20 (repeatable)")
    show.add_argument("name", nargs="?", help="preset name or YAML path (same as --config)")
    args = parser.parse_args(argv)
    try:
        overrides = parse_sets(args.set)
        name = getattr(args, "name", None)
        if name and args.config and name != args.config:
            raise ConfigError(f"two configurations given, {name!r} and --config {args.config!r}: give one")
        config = name or args.config or "quickstart"
        cfg = load_config(config, overrides)  # schema errors: before Prefect
        if args.command == "config":
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
            return 0
        from flows import FLOWS
        from flows.temporary_server import start_temporary_server

        names = list(FLOWS) if args.flow == "both" else [args.flow]
        if args.command == "plan":  # no Prefect server: nothing runs
            print(plan_table(config, overrides, names))
            return 0
        start_temporary_server()  # where no server is configured: one that stops with this command, even killed
        results = {name: FLOWS[name](config=config, overrides=overrides) for name in names}
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


if __name__ == "__main__":
    sys.exit(main())
