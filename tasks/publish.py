"""The run's face in the Prefect UI: the markdown report (its loss curves in it), a metrics table and links to the
artifacts. Not cached: a nightly run that reuses every stage still publishes tonight's report."""

from __future__ import annotations

import base64
import re

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from distill.plan import Run, open_store
from distill.report import CURVES_IMAGE, accuracy_table_rows, metrics_rows
from distill.stages.evaluate import EvaluateManifest
from distill.stages.export import ExportManifest, example_prompt, llama_cpp_section


def artifact_key(*parts: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:120]


@task(name="publish_report")
def publish_report(run: Run, metrics: EvaluateManifest, exported: ExportManifest) -> dict[str, str]:
    store = open_store(run.config, check=False)
    key = artifact_key(run.flow, run.config.name)
    # The browser that shows the report cannot reach the artifact store, so the loss curves travel inside it
    png = base64.b64encode(store.read_bytes(metrics.curves_png)).decode()
    report = store.read_bytes(metrics.report).decode().replace(f"]({CURVES_IMAGE})", f"](data:image/png;base64,{png})")
    if exported.gguf is not None:  # the export comes after the evaluate stage's report: its GGUF is added here
        where = store.url(f"{exported.path}/{exported.gguf.file}")
        report += "\n\n## Run it with llama.cpp\n\n" + llama_cpp_section(exported.gguf, where, example_prompt(run.config))
    create_markdown_artifact(report, key=f"{key}-report", description=f"{run.flow} report for {run.config.name}")
    create_table_artifact(metrics_rows(metrics.results), key=f"{key}-metrics", description="held-out metrics")
    if metrics.lm_eval_table:
        create_table_artifact(accuracy_table_rows(metrics.lm_eval_table), key=f"{key}-lm-eval",
                              description="benchmark accuracy (lm-evaluation-harness): "
                                          + ", ".join(run.config.eval.lm_eval.tasks))
    links = {"student": exported.path, "report": metrics.report, "loss curves": metrics.curves_png,
             "metrics.json": metrics.metrics, **metrics.checkpoints}
    if exported.gguf is not None:
        links["student gguf"] = f"{exported.path}/{exported.gguf.file}"
    if metrics.lm_eval:
        links["lm_eval.json"] = metrics.lm_eval
    for name, path in links.items():
        # The report's link must not take the markdown report's own key (the UI shows the latest artifact of a key).
        link_key = artifact_key(key, "report-md" if name == "report" else name)
        create_link_artifact(store.url(path), link_text=name, key=link_key,
                             description=f"{name} of {run.flow} / {run.config.name}")
    return {name: store.url(path) for name, path in links.items()}
