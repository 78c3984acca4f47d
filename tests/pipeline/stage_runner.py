"""Run the first stages of a flow without Prefect, for tests that SIGKILL a real process mid-stage.

    python -m tests.pipeline.stage_runner CONFIG OVERRIDES_JSON FLOW {cache,train}

Prints the run's plan (``distill.plan.Run`` as JSON) last.
"""

import json
import logging
import sys

from distill.plan import plan_run
from distill.stage import execute
from distill.stages import STAGES


def main(config: str, overrides: str, flow: str, until: str) -> None:
    run, _ = plan_run(flow, config, json.loads(overrides), logging.getLogger("stage_runner"))

    def stage(name: str, **inputs):
        return execute(STAGES[name], run.context(name), **inputs)

    tokens = stage("tokenize")
    cache = stage("teacher_cache", tokens=tokens) if "teacher_cache" in run.stages else None
    if until == "train":
        if flow == "self-distill":
            stage("self_distill", tokens=tokens, cache=cache)
        else:
            stage("superposition", cache=cache)
    print(run.model_dump_json())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)  # the stages' messages, for the tests to read
    main(*sys.argv[1:])
