"""Run the first stages of a flow without Prefect, for tests that SIGKILL a real process mid-stage.

    python -m tests.pipeline.stage_runner CONFIG OVERRIDES_JSON FLOW {cache,train}
"""

import json
import logging
import sys

from distill import data, teacher_cache, train_self, train_superposition
from distill.config import load_config
from distill.plan import make_plan, open_store, preflight
from distill.progress import Reporter


def main(config: str, overrides: str, flow: str, until: str) -> None:
    cfg = load_config(config, json.loads(overrides))
    plan = make_plan(cfg, flow, preflight(cfg, flow))
    store = open_store(cfg)
    tokens = data.run_tokenize(cfg, store, plan["tokenize"], Reporter())
    cache = None
    if "cache_teacher" in plan:
        cache = teacher_cache.run_cache_teacher(cfg, store, plan["cache_teacher"], Reporter(), tokens=tokens)
    if until == "train":
        if flow == "self-distill":
            train_self.run_self_distill(cfg, store, plan["train"], Reporter(), tokens=tokens, cache=cache)
        else:
            train_superposition.run_superposition(cfg, store, plan["train"], Reporter(), cache=cache)
    print(json.dumps(plan))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)  # the stages' messages, for the tests to read
    main(*sys.argv[1:])
