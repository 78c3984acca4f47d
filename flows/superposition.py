"""superposition-distill: tokenize -> cache the teacher's hidden states -> train a small BitNet student and its
decompressor against them -> retrain the student's LM head -> evaluate -> export."""

from __future__ import annotations

from typing import Any

from prefect import flow

from .prepare import prepare

FLOW = "superposition-distill"


@flow(name=FLOW, log_prints=True)
def superposition_distill(config: str = "quickstart", overrides: dict[str, Any] | None = None) -> dict:
    """Distil the teacher into a smaller BitNet student by reconstructing its hidden states.

    Args:
        config: a preset name from configs/ (e.g. "quickstart") or a YAML path relative to the repository.
        overrides: dotted keys to values, e.g. {"train.steps": 20, "storage.root": "s3://bucket/prefix"}.
    """
    p = prepare(FLOW, config, overrides)
    tokens = p.stage("tokenize")(p.config, p.plan["tokenize"])
    cache = p.stage("cache_teacher")(p.config, p.plan["cache_teacher"], tokens)
    trained = p.stage("train_superposition_student")(p.config, p.plan["train"], cache)
    student = p.stage("retrain_lm_head")(p.config, p.plan["lm_head"], trained, tokens, cache)
    return p.finish(student, tokens)
