"""What both flows do around their stages: plan the run before the first (the configuration resolved and checked
once, every stage's fingerprint and directory logged), run each stage as the one Prefect task, and publish the
report at the end."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger

from distill.config import PipelineConfig
from distill.plan import plan_run, stage_states
from distill.stage import Manifest
from tasks.publish import publish_report
from distill.stages import STAGES
from tasks.result_storage import result_storage
from tasks.shards import run_shards
from tasks.stage import run_stage

FINISHED = "finished: reused"


class FlowRun:
    """A planned run inside its flow."""

    def __init__(self, flow: str, config: str | PipelineConfig, overrides: dict[str, Any] | None):
        logger = get_run_logger()
        self.run, store = plan_run(flow, config, overrides, logger)
        self.states = stage_states(self.run, store)
        self.result_storage = result_storage(store)
        logger.info("artifacts under %s, run %s", store.url(), self.run.name)
        sd, cfg = self.run.config.self_distill, self.run.config
        if flow == "self-distill" and sd.steps and sd.steps != cfg.train.steps:  # a --set train.steps would look ignored
            logger.info("self-distillation runs self_distill.steps = %d steps (train.steps = %d is the superposition "
                        "flow's); set self_distill.steps to change it", sd.steps, cfg.train.steps)
        for name, stage in self.run.stages.items():
            logger.info("stage %-13s %s  %s -> %s", name, stage.fingerprint, self.states[name], stage.path)

    def __contains__(self, stage: str) -> bool:
        return stage in self.run.stages

    def stage(self, name: str, **inputs: Manifest | None) -> Manifest:
        """Stage ``name`` as a task; on a Ray backend, the shards of a stage that has them first, on the cluster."""
        finished = self.states[name] == FINISHED
        compute = self.run.config.compute
        if not finished and compute.backend == "ray":
            shards = STAGES[name].shards(self.run.context(name), compute.ray.workers, **inputs)
            if shards:
                run_shards(self.run, name, shards, self.result_storage, **inputs)
        return run_stage(self.run, name, finished=finished, result_storage=self.result_storage, **inputs)

    def publish(self, metrics: Manifest, exported: Manifest) -> dict:
        """The report in the UI; the flow's return value."""
        links = publish_report(self.run, metrics, exported)
        results = {name: m.model_dump(exclude_none=True) for name, m in metrics.results.items()}
        out = {"flow": self.run.flow, "run": self.run.name, "links": links, "export": exported.model_dump(),
               "metrics": {**results, "packed_bytes": metrics.packed_bytes, "fp16_bytes": metrics.fp16_bytes}}
        if metrics.lm_eval_table:
            out["lm_eval"] = [row.model_dump() for row in metrics.lm_eval_table]
        return out
