"""Command line: run a flow locally (on Prefect's embedded default or the configured server), or show the
resolved configuration.

    python -m flows run both --config quickstart          # both flows, then one summary table
    python -m flows run superposition-distill --config quickstart --set train.steps=20
    python -m flows run self-distill --config configs/tinyllama.yaml --set self_distill.delta=lora:16
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a flow end to end (finished stages are reused)")
    run.add_argument("flow", choices=["superposition-distill", "self-distill", "both"])
    show = sub.add_parser("config", help="print the resolved configuration")
    for p in (run, show):
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

        start_temporary_server()  # where no server is configured: one that stops with this command, even killed
        names = list(FLOWS) if args.flow == "both" else [args.flow]
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
