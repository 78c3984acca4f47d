"""What both flows do before their first stage: resolve the configuration, check it against the teacher, plan
every stage's fingerprint and path, and point Prefect's result storage at the artifact root."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger

from distill.config import load_config
from distill.plan import make_plan, open_store, preflight
from tasks import stages
from tasks.result_storage import result_storage
from tasks.publish import publish_report


@dataclass
class Prepared:
    flow: str
    config: dict  # the resolved configuration, as tasks receive it
    plan: dict[str, dict]
    task_options: dict[str, Any]

    @property
    def fingerprints(self) -> dict[str, str]:
        return {name: stage["fingerprint"] for name, stage in self.plan.items() if "fingerprint" in stage}

    def stage(self, name: str):
        """A stage task with this run's result storage."""
        return getattr(stages, name).with_options(**self.task_options)

    def finish(self, student: dict, tokens: dict) -> dict:
        """evaluate -> export -> publish the report; the flow's return value."""
        metrics = self.stage("evaluate_student")(self.config, self.plan["evaluate"], self.flow, student, tokens,
                                                 self.fingerprints)
        exported = self.stage("export_student")(self.config, self.plan["export"], self.flow, student, metrics)
        links = publish_report(self.config, self.flow, metrics, exported)
        return {"flow": self.flow, "run": self.plan["run"]["name"], "metrics": metrics, "export": exported,
                "links": links}


def prepare(flow: str, config: str | dict, overrides: dict[str, Any] | None) -> Prepared:
    cfg = load_config(config, overrides)
    teacher = preflight(cfg, flow)
    store = open_store(cfg)  # checks the store: an unreachable endpoint, a missing bucket or credentials fail here
    plan = make_plan(cfg, flow, teacher)
    logger = get_run_logger()
    logger.info("artifacts under %s, run %s", store.url(plan["run"]["path"]), plan["run"]["name"])
    sd = cfg.self_distill
    if flow == "self-distill" and sd.steps and sd.steps != cfg.train.steps:  # a --set train.steps would look ignored
        logger.info("self-distillation runs self_distill.steps = %d steps (train.steps = %d is the superposition "
                    "flow's); set self_distill.steps to change it", sd.steps, cfg.train.steps)
    for name, stage in plan.items():
        if "fingerprint" in stage:
            logger.info("stage %-14s fingerprint %s -> %s", name, stage["fingerprint"], stage["path"])
    options = {"result_storage": result_storage(store)}
    return Prepared(flow, cfg.model_dump(mode="json"), plan, options)
