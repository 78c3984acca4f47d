"""What both flows do before their first stage: resolve the configuration, check it against the teacher, plan
every stage's fingerprint and path, and point Prefect's result storage at the artifact root."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger

from distill.config import PipelineConfig, load_config
from distill.data import pin_dataset_revision, unknown_dataset_version
from distill.plan import make_plan, open_store, pin_teacher_revision, preflight
from storage import ArtifactStore
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


def pin_data_revision(cfg: PipelineConfig, logger) -> PipelineConfig:
    """A Hub dataset's revision resolved to the commit it names (``distill.data.pin_dataset_revision``); the log says
    which, or why it is unknown."""
    pinned = pin_dataset_revision(cfg.data)
    if pinned.revision != cfg.data.revision:
        logger.info("data: %s revision %s is commit %s", cfg.data.dataset, cfg.data.revision or "main",
                    pinned.revision)
    elif unknown_dataset_version(pinned):
        logger.warning("data: the commit of %s revision %s is unknown (the Hub did not say: offline, no access or "
                       "no such dataset; nor does the local Hugging Face cache): its token shards are fingerprinted "
                       "by name and revision only, so a run after an upstream change would reuse them; set "
                       "data.revision to a commit to pin one version",
                       cfg.data.dataset, cfg.data.revision or "main")
    return cfg.model_copy(update={"data": pinned})


def plan_run(flow: str, config: str | dict, overrides: dict[str, Any] | None,
             logger) -> tuple[PipelineConfig, ArtifactStore, dict[str, dict]]:
    """The resolved configuration (a Hub dataset's and a Hub teacher's revisions pinned to the commits the plan's
    fingerprints name), its artifact store (checked) and the plan of every stage of ``flow``; a bad configuration
    fails here, before any work."""
    cfg = pin_data_revision(load_config(config, overrides), logger)
    teacher = preflight(cfg, flow)
    store = open_store(cfg)  # checks the store: an unreachable endpoint, a missing bucket or credentials fail here
    return pin_teacher_revision(cfg, teacher), store, make_plan(cfg, flow, teacher)


def prepare(flow: str, config: str | dict, overrides: dict[str, Any] | None) -> Prepared:
    logger = get_run_logger()
    cfg, store, plan = plan_run(flow, config, overrides, logger)
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
