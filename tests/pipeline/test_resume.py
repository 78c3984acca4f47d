"""Kill a real process in the middle of training, rerun, and get exactly the uninterrupted result."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.config import load_config
from distill.plan import open_store
from storage import checkpoints, layout
from storage.tensors import read_tensors

from .conftest import TINY, tiny_overrides

REPO = Path(__file__).resolve().parents[2]


def start(overrides: dict, flow: str, until: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.pipeline.stage_runner", TINY, json.dumps(overrides), flow,
                             until], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def finish(proc: subprocess.Popen, log: list | None = None) -> dict:
    """The plan the stage runner printed; its stderr (the stages' log) appended to ``log``."""
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    if log is not None:
        log.append(err)
    return json.loads(out.strip().splitlines()[-1])


def training(plan: dict) -> dict:
    """The training stage of a plan the stage runner printed."""
    return plan["stages"]["self_distill" if plan["flow"] == "self-distill" else "superposition"]


def kill_after_first_checkpoint(overrides: dict, flow: str, directory: str) -> int:
    """The step of the last checkpoint the killed run left under ``directory``."""
    store = open_store(load_config(TINY, overrides))
    proc = start(overrides, flow, "train")
    deadline = time.monotonic() + 240
    while checkpoints.latest_checkpoint(store, directory) is None:
        assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return int(checkpoints.latest_checkpoint(store, directory).rsplit("-", 1)[1])


# adamw8bit on the superposition student: its embedding (384 x 32) is large enough for 8-bit moments
@pytest.mark.parametrize("flow,optimizer", [("self-distill", "adamw"), ("superposition-distill", "adamw"),
                                            ("superposition-distill", "adamw8bit")])
def test_training_resumes_after_sigkill_and_matches_an_uninterrupted_run(tiny_teacher, tmp_path, flow, optimizer):
    if optimizer == "adamw8bit":
        pytest.importorskip("torchao.optim")
    settings = {"train.steps": 40, "train.checkpoint_every": 4, "train.eval_every": 20, "train.optimizer": optimizer}
    straight = tiny_overrides(tiny_teacher, tmp_path / "straight", **settings)
    plan = finish(start(straight, flow, "train"))
    trained = training(plan)
    checkpoint_dir = layout.checkpoints_dir(trained["path"])

    killed = tiny_overrides(tiny_teacher, tmp_path / "killed", **settings)
    killed_at = kill_after_first_checkpoint(killed, flow, checkpoint_dir)
    # resumed with another checkpoint cadence and retention: the same run (they are not in its fingerprint)
    resumed, log = {**killed, "train.checkpoint_every": 7, "train.keep_checkpoints": 1}, []
    assert training(finish(start(resumed, flow, "train"), log)) == trained
    # from the checkpoint, not from step 0 (a restart would give the same curve and weights too)
    assert re.search(rf": resuming from step {killed_at} \(", log[0]), log[0][-3000:]

    stores = [open_store(load_config(TINY, o)) for o in (straight, killed)]
    histories = [s.read_json(trained["path"] + "/history.json") for s in stores]
    assert [h["loss"] for h in histories[0]] == [h["loss"] for h in histories[1]]  # the curve continues exactly
    weights = [read_tensors(s, trained["path"] + "/weights.safetensors") for s in stores]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    if optimizer == "adamw8bit":  # the resumed state really was 8-bit
        _, meta = checkpoints.load_checkpoint(stores[1], checkpoints.latest_checkpoint(stores[1], checkpoint_dir))
        moments = [v for state in meta["optimizer"]["state"].values() for v in state.values()]
        assert any(type(m).__name__ == "OptimState8bit" for m in moments)


def test_teacher_cache_stage_resumes_after_sigkill_and_matches_an_uninterrupted_build(tiny_teacher, tmp_path):
    import zarr

    from storage.cache_spec import GROUP_DIR, record_path, recorded_chunks

    settings = {"cache.batch_size": 1, "data.max_train_rows": 60, "cache.topk": 4}
    straight = tiny_overrides(tiny_teacher, tmp_path / "straight", **settings)
    plan = finish(start(straight, "superposition-distill", "cache"))
    train_cache = plan["stages"]["teacher_cache"]["path"] + "/train"

    killed = tiny_overrides(tiny_teacher, tmp_path / "killed", **settings)
    store = open_store(load_config(TINY, killed))
    proc = start(killed, "superposition-distill", "cache")
    deadline = time.monotonic() + 240
    while not recorded_chunks(store, train_cache):
        assert proc.poll() is None and time.monotonic() < deadline, "the cache was built before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survived = recorded_chunks(store, train_cache)
    assert 0 < len(survived) < 60
    records = {c: (tmp_path / "killed" / train_cache / record_path(c)).stat().st_mtime_ns for c in survived}
    finish(start(killed, "superposition-distill", "cache"))
    # only the missing chunks were written again: the survivors' records are the killed run's own
    assert {c: (tmp_path / "killed" / train_cache / record_path(c)).stat().st_mtime_ns for c in survived} == records
    assert len(recorded_chunks(store, train_cache)) == 60

    groups = [zarr.open_group(str(root / train_cache / GROUP_DIR), mode="r") for root in
              (tmp_path / "straight", tmp_path / "killed")]
    names = sorted(name for name, _ in groups[0].arrays())
    assert names == sorted(name for name, _ in groups[1].arrays()) and "topk_values" in names
    for name in names:
        assert groups[0][name][:].tobytes() == groups[1][name][:].tobytes(), name


def test_sigterm_writes_a_checkpoint_at_the_current_step(tiny_teacher, tmp_path):
    overrides = tiny_overrides(tiny_teacher, tmp_path, **{"train.steps": 2000, "train.checkpoint_every": 7,
                                                          "train.eval_every": 1000})
    store = open_store(load_config(TINY, overrides))
    proc = start(overrides, "self-distill", "train")
    deadline = time.monotonic() + 240
    while not (found := [p for p in store.find("runs") if p.endswith("/step-7/_COMPLETE.json")]):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    checkpoint_dir = found[0].rsplit("/step-7/", 1)[0]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    stopped = re.search(r"stopped by signal 15 at step (\d+); a checkpoint was written, rerun to resume", err)
    assert stopped, err[-2000:]
    assert checkpoints.latest_checkpoint(store, checkpoint_dir).endswith(f"/step-{stopped.group(1)}")


@pytest.mark.slow
def test_a_killed_flow_resumes_from_its_checkpoint_when_the_flow_runs_again(tiny_teacher, tmp_path):
    """The whole flow, not only its stage functions: `python -m flows run` killed mid-training, then run again."""
    overrides = tiny_overrides(tiny_teacher, tmp_path, **{"train.steps": 60, "train.checkpoint_every": 4,
                                                          "train.eval_every": 30, "eval.max_new_tokens": 0})
    command = [sys.executable, "-m", "flows", "run", "self-distill", "--config", TINY,
               *(arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}"))]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect")}
    store = open_store(load_config(TINY, overrides))
    # In a session of its own, so that the kill takes the command's whole process group, as losing the machine
    # would (the temporary Prefect server, in a session of its own, then stops through its watchdog:
    # tests/pipeline/test_cli.py).
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (found := [p for p in store.find("runs") if "/checkpoints/step-" in p and p.endswith("_COMPLETE.json")]):
        assert proc.poll() is None, "the flow ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stage_dir = found[0].split("/checkpoints/", 1)[0]
    killed_at = int(checkpoints.latest_checkpoint(store, layout.checkpoints_dir(stage_dir)).rsplit("-", 1)[1])
    assert killed_at < 60

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = re.search(r"self_distill: resuming from step (\d+)", again.stdout + again.stderr)
    assert resumed and int(resumed.group(1)) >= killed_at, (again.stdout + again.stderr)[-3000:]
    history = store.read_json(f"{stage_dir}/history.json")
    assert [h["step"] for h in history] == list(range(1, 61))
