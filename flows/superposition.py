"""superposition-distill: tokenize -> teacher_cache (the teacher's hidden states) -> superposition (a small BitNet
student and its decompressor trained to reconstruct them) -> lm_head (the student's head retrained) -> evaluate ->
export."""

from __future__ import annotations

from typing import Any

from prefect import flow

from distill.config import PipelineConfig

from .prepare import FlowRun

FLOW = "superposition-distill"


@flow(name=FLOW, log_prints=True)
def superposition_distill(config: str | PipelineConfig = "quickstart",
                          overrides: dict[str, Any] | None = None) -> dict:
    """Distil the teacher into a smaller BitNet student by reconstructing its hidden states.

    Args:
        config: a preset name from configs/ (e.g. "quickstart") or a YAML path relative to the repository.
        overrides: dotted keys to values, e.g. {"train.steps": 20, "storage.root": "s3://bucket/prefix"}.
    """
    run = FlowRun(FLOW, config, overrides)
    tokens = run.stage("tokenize")
    cache = run.stage("teacher_cache", tokens=tokens)
    trained = run.stage("superposition", cache=cache)
    student = run.stage("lm_head", trained=trained, tokens=tokens, cache=cache)
    metrics = run.stage("evaluate", student=student, tokens=tokens)
    exported = run.stage("export", student=student, metrics=metrics)
    return run.publish(metrics, exported)
