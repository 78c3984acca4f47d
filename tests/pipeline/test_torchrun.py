"""Training under torchrun, for users without Ray: 2 processes (gloo) train the self-distillation stage to the
single process's run, and the flow afterwards reuses it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.plan import plan_run

from .conftest import TINY, tiny_overrides
from .test_ray import check_same_run, planned, trained

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_torchrun_trains_the_single_process_run(tiny_teacher, tmp_path):
    import logging

    steps = {"self_distill.steps": 6, "train.checkpoint_every": 3}
    run, store = planned(tiny_teacher, tmp_path / "one", **steps)
    one = trained(run, "tokenize", "self_distill")

    overrides = tiny_overrides(tiny_teacher, tmp_path / "torchrun", **steps)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "distill.distributed", "self-distill", "--config", TINY,
               *(arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}"))]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run, other_store = plan_run("self-distill", TINY, overrides, logging.getLogger())
    assert f"trained self_distill: {run.stages['self_distill'].path}" in proc.stdout
    two = trained(run, "tokenize", "self_distill")  # finished by torchrun: returned as stored
    check_same_run(store, one, other_store, two)


def test_without_torchrun_it_says_how_to_run_it():
    proc = subprocess.run([sys.executable, "-m", "distill.distributed", "self-distill"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and proc.stderr.startswith("error: run under torchrun (it sets WORLD_SIZE)")
