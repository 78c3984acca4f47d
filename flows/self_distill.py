"""self-distill: tokenize -> (teacher_cache, with self_distill.teacher_signal: cache) -> self_distill (dW of the
dual-mode model) -> evaluate -> export in transformers' bitnet format. The teacher signal is online by default: the
same model switched to teacher mode for each batch, no second copy in memory."""

from __future__ import annotations

from typing import Any

from prefect import flow

from distill.config import PipelineConfig

from .prepare import FlowRun

FLOW = "self-distill"


@flow(name=FLOW, log_prints=True)
def self_distill(config: str | PipelineConfig = "quickstart", overrides: dict[str, Any] | None = None) -> dict:
    """Distil the teacher into its own BitNet b1.58 version (ternary W + dW, int8 activations).

    Args:
        config: a preset name from configs/ (e.g. "quickstart") or a YAML path relative to the repository.
        overrides: dotted keys to values, e.g. {"self_distill.steps": 20, "self_distill.delta": "lora:16"}
            (``self_distill.steps``, where set as in the presets, wins over ``train.steps``).
    """
    run = FlowRun(FLOW, config, overrides)
    tokens = run.stage("tokenize")
    cache = run.stage("teacher_cache", tokens=tokens) if "teacher_cache" in run else None
    student = run.stage("self_distill", tokens=tokens, cache=cache)
    metrics = run.stage("evaluate", student=student, tokens=tokens)
    exported = run.stage("export", student=student, metrics=metrics)
    return run.publish(metrics, exported)
