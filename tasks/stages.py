"""One Prefect task per pipeline stage. Each is a thin wrapper: it resolves the configuration, calls the
stage in ``distill/`` with a reporter that feeds the Prefect UI, and returns the stage's small manifest."""

from __future__ import annotations

from distill import data, evaluate, export, lm_head, teacher_cache, train_self, train_superposition
from distill.config import load_config
from distill.plan import open_store

from .common import PrefectReporter, stage_task


def _run(stage_fn, config: dict, stage: dict, **inputs) -> dict:
    cfg = load_config(config)
    return stage_fn(cfg, open_store(cfg), stage, reporter=PrefectReporter(), **inputs)


@stage_task("tokenize")
def tokenize(config: dict, stage: dict) -> dict:
    return _run(data.run_tokenize, config, stage)


@stage_task("cache-teacher")
def cache_teacher(config: dict, stage: dict, tokens: dict) -> dict:
    return _run(teacher_cache.run_cache_teacher, config, stage, tokens=tokens)


@stage_task("train-superposition")
def train_superposition_student(config: dict, stage: dict, cache: dict) -> dict:
    return _run(train_superposition.run_superposition, config, stage, cache=cache)


@stage_task("retrain-lm-head")
def retrain_lm_head(config: dict, stage: dict, trained: dict, tokens: dict, cache: dict) -> dict:
    return _run(lm_head.run_lm_head, config, stage, trained=trained, tokens=tokens, cache=cache)


@stage_task("train-self-distill")
def train_self_distill(config: dict, stage: dict, tokens: dict, cache: dict | None) -> dict:
    return _run(train_self.run_self_distill, config, stage, tokens=tokens, cache=cache)


@stage_task("evaluate")
def evaluate_student(config: dict, stage: dict, flow: str, student: dict, tokens: dict, fingerprints: dict) -> dict:
    return _run(evaluate.run_evaluate, config, stage, flow=flow, student=student, tokens=tokens,
                fingerprints=fingerprints)


@stage_task("export")
def export_student(config: dict, stage: dict, flow: str, student: dict, metrics: dict) -> dict:
    return _run(export.run_export, config, stage, flow=flow, student=student, metrics=metrics)
