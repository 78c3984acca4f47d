"""The evaluation report: a markdown page (configuration, metrics table, samples, artifact locations), a
metrics table for the Prefect UI, and loss curves as a PNG for people and JSON for machines."""

from __future__ import annotations

import io
import json

import yaml

CURVES_IMAGE = "loss_curves.png"  # beside report.md, which shows it

ROW_LABELS = {
    "teacher": "teacher",
    "ptq_ternary": "naive ternary (PTQ, dW = 0)",
    "student": "student",
    "student_via_teacher_head": "student decoded through the teacher's head",
}


def metrics_rows(metrics) -> list[dict]:
    """One row per model: perplexity, KL to the teacher, top-1 agreement (``metrics``: by model name, as dicts or
    the evaluate stage's ``ModelMetrics``)."""
    rows = []
    for key, label in ROW_LABELS.items():
        if key not in metrics:
            continue
        m = metrics[key] if isinstance(metrics[key], dict) else metrics[key].model_dump(exclude_none=True)
        rows.append({
            "model": label,
            "perplexity": round(m["perplexity"], 3),
            "kl_to_teacher": round(m["kl_to_teacher"], 4) if "kl_to_teacher" in m else "",
            "top1_agreement": round(m["top1_agreement"], 4) if "top1_agreement" in m else "",
        })
    return rows


def accuracy_table_rows(rows) -> list[dict]:
    """The benchmark accuracy table for people (``rows``: ``distill.harness.AccuracyRow``s, or their dicts)."""
    out = []
    for row in rows:
        r = row if isinstance(row, dict) else row.model_dump()
        out.append({"task": r["task"], "metric": r["metric"], "n": r["n"] if r["n"] is not None else "",
                    "teacher": round(r["teacher"], 4), "naive ternary": round(r["ptq_ternary"], 4),
                    "student": round(r["student"], 4), "student - teacher": f"{r['student_minus_teacher']:+.4f}"})
    return out


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    return "\n".join(lines)


def markdown_report(metrics: dict, samples: dict[str, list[dict]], locations: dict[str, str]) -> str:
    size = (f"{metrics['packed_bytes'] / 2**20:.2f} MiB packed vs {metrics['fp16_bytes'] / 2**20:.2f} MiB at fp16 "
            f"({metrics['fp16_bytes'] / max(metrics['packed_bytes'], 1):.1f}x smaller)")
    parts = [
        f"# {metrics['flow']}: {metrics['config']['name']}",
        f"Teacher `{metrics['config']['teacher']['name_or_path']}`, evaluated on {metrics['teacher']['tokens']} "
        "held-out tokens.",
        "## Metrics",
        markdown_table(metrics_rows(metrics)),
        f"Ternary layers: {size}.",
        "## Loss curves",
        f"![loss curves]({CURVES_IMAGE})",
    ]
    if "student" in metrics and "hidden_cosine" in metrics["student"]:
        cos = ", ".join(f"{c:.3f}" for c in metrics["student"]["hidden_cosine"])
        parts.append(f"Per-layer hidden cosine (student vs teacher): {cos}.")
    if metrics.get("lm_eval"):
        lm = metrics["config"]["eval"]["lm_eval"]
        shots = "each task's default" if lm["num_fewshot"] is None else lm["num_fewshot"]
        parts += ["## Benchmark accuracy (lm-evaluation-harness)",
                  f"Few-shot: {shots}; examples per task: {lm['limit'] or 'all'} (n). The harness's own results, "
                  "standard errors included, are in lm_eval.json.",
                  markdown_table(accuracy_table_rows(metrics["lm_eval"]))]
    parts.append("## Samples (greedy)")
    for model, items in samples.items():
        parts.append(f"**{model}**\n")
        parts += [f"- `{s['prompt']}` -> `{s['completion']!r}`" for s in items]
    parts.append("## Artifacts")
    parts += [f"- {name}: `{where}`" for name, where in locations.items()]
    parts.append("## Configuration")
    parts.append("```yaml\n" + yaml.safe_dump(metrics["config"], sort_keys=False) + "```")
    parts.append("## Fingerprints")
    parts += [f"- {stage}: `{fp}`" for stage, fp in metrics["fingerprints"].items()]
    return "\n\n".join(parts) + "\n"


def loss_curves_png(curves: dict[str, list[dict]]) -> bytes:
    """One panel per training stage: training loss per step, with held-out values where they were measured."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(curves), 1), figsize=(6 * max(len(curves), 1), 4), squeeze=False)
    for ax, (name, history) in zip(axes[0], curves.items()):
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", lw=1)
        for key in sorted({k for h in history for k in h if k.startswith("eval_")}):
            points = [(h["step"], h[key]) for h in history if key in h and "perplexity" not in key]
            if points:
                ax.plot(*zip(*points), "o-", label=key.replace("_", " "), ms=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def loss_curves_json(curves: dict[str, list[dict]]) -> bytes:
    return json.dumps(curves, indent=1).encode()
