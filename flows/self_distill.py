"""self-distill: tokenize -> (optionally cache the teacher) -> train dW of the dual-mode model -> evaluate ->
export in transformers' bitnet format. The teacher signal is online by default: the same model switched to
teacher mode for each batch, no second copy in memory."""

from __future__ import annotations

from typing import Any

from prefect import flow

from .prepare import prepare

FLOW = "self-distill"


@flow(name=FLOW, log_prints=True)
def self_distill(config: str = "quickstart", overrides: dict[str, Any] | None = None) -> dict:
    """Distil the teacher into its own BitNet b1.58 version (ternary W + dW, int8 activations).

    Args:
        config: a preset name from configs/ (e.g. "quickstart") or a YAML path relative to the repository.
        overrides: dotted keys to values, e.g. {"self_distill.steps": 20, "self_distill.delta": "lora:16"}
            (``self_distill.steps``, where set as in the presets, wins over ``train.steps``).
    """
    p = prepare(FLOW, config, overrides)
    tokens = p.stage("tokenize")(p.config, p.plan["tokenize"])
    cache = None
    if "cache_teacher" in p.plan:
        cache = p.stage("cache_teacher")(p.config, p.plan["cache_teacher"], tokens)
    student = p.stage("train_self_distill")(p.config, p.plan["train"], tokens, cache)
    return p.finish(student, tokens)
