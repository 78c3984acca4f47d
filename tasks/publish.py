"""The run's face in the Prefect UI: a keyed markdown report, a metrics table and links to the artifacts.

Not cached: a nightly run that reuses every stage still publishes tonight's report.
"""

from __future__ import annotations

import re

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from distill.config import load_config
from distill.plan import open_store
from distill.report import metrics_rows


def artifact_key(*parts: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:120]


@task(name="publish-report")
def publish_report(config: dict, flow: str, metrics: dict, exported: dict) -> dict:
    cfg = load_config(config)
    store = open_store(cfg)
    key = artifact_key(flow, cfg.name)
    report = store.read_bytes(metrics["report_path"]).decode()
    create_markdown_artifact(report, key=f"{key}-report", description=f"{flow} report for {cfg.name}")
    create_table_artifact(metrics_rows(metrics), key=f"{key}-metrics", description="held-out metrics")
    links = {"student": exported["path"], "report": metrics["report_path"], "loss curves": metrics["curves_png"],
             "metrics.json": metrics["metrics_path"]}
    if metrics.get("checkpoints"):
        links["checkpoints"] = metrics["checkpoints"]
    if metrics.get("training_checkpoints"):  # superposition: "checkpoints" are the LM head's
        links["student checkpoints"] = metrics["training_checkpoints"]
    for name, path in links.items():
        # The report's link must not take the markdown report's own key (the UI shows the latest artifact of a key).
        link_key = artifact_key(key, "report-md" if name == "report" else name)
        create_link_artifact(store.url(path), link_text=name, key=link_key,
                             description=f"{name} of {flow} / {cfg.name}")
    return {name: store.url(path) for name, path in links.items()}
