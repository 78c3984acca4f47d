"""Scale-out on a local Ray instance (2 CPU workers, gloo): the teacher cache written by shard tasks on prefect-ray
is the single process's cache byte for byte; training on 2 DDP workers is the single process's run, to float
rounding; a run resumes across a change of worker count."""

import logging
import shutil

import pytest
import torch

from distill.plan import plan_run
from distill.stage import execute
from distill.stages import STAGES
from storage import layout
from storage.tensors import read_tensors

from .conftest import TINY, tiny_overrides
from .test_shards import files

pytest.importorskip("ray")
pytest.importorskip("prefect_ray")
pytestmark = pytest.mark.slow

RAY = {"compute.backend": "ray", "compute.ray.workers": 2}
SHARDED = {**RAY, "compute.shard_params": True}  # FSDP2 instead of DDP
# DDP averages the two halves' losses and gradients where one process averages the whole batch's: the same maths,
# summed in another order, so float32 rounding is all that differs (measured: at most 8e-9 on the tiny teacher's
# KL of about 3e-4, so relative to it up to 3e-5), grown a little over the steps by the optimiser
LOSS_RTOL, LOSS_ATOL, WEIGHT_ATOL = 1e-4, 1e-7, 1e-5


@pytest.fixture(autouse=True, scope="module")
def _print_restored():
    """Ray's driver replaces builtins.print with its progress bars' print (ray.experimental.tqdm_ray) and leaves it
    after ray.shutdown: the tests after these get Python's own back."""
    import builtins

    original = builtins.print
    yield
    builtins.print = original


def planned(tiny_teacher, root, flow="self-distill", **overrides):
    return plan_run(flow, TINY, tiny_overrides(tiny_teacher, root, **overrides), logging.getLogger())


def trained(run, *names):
    """Run ``names`` in order (each taking the manifests before it); the last one's manifest."""
    done = {}
    for name in names:
        inputs = {"tokenize": {}, "teacher_cache": {"tokens": done.get("tokenize")},
                  "self_distill": {"tokens": done.get("tokenize")}, "superposition": {"cache": done.get("teacher_cache")},
                  "lm_head": {"trained": done.get("superposition"), "tokens": done.get("tokenize"),
                              "cache": done.get("teacher_cache")}}[name]
        done[name] = execute(STAGES[name], run.context(name), **inputs)
    return done[names[-1]]


def cache_on_one_process_and_ray_shards(tiny_teacher, tmp_path):
    """The single process's finished cache, and the Ray run's plan, store, tokens and 2 shards per split."""
    cache = {"cache.batch_size": 4, "data.max_train_rows": 40}
    run, _ = planned(tiny_teacher, tmp_path / "one", "superposition-distill", **cache)
    single = trained(run, "tokenize", "teacher_cache")
    run, store = planned(tiny_teacher, tmp_path / "ray", "superposition-distill", **cache, **RAY)
    tokens = trained(run, "tokenize")
    shards = STAGES["teacher_cache"].shards(run.context("teacher_cache"), 2, tokens=tokens)
    return single, run, store, tokens, shards


@pytest.mark.usefixtures("prefect_harness")
def test_cache_shards_on_ray_give_the_single_process_cache(tiny_teacher, tmp_path):
    from tasks.result_storage import result_storage
    from tasks.shards import run_shards

    single, run, store, tokens, shards = cache_on_one_process_and_ray_shards(tiny_teacher, tmp_path)
    assert [s.name for s in shards] == ["train-0-4", "train-5-9", "eval-0-0", "eval-1-1"]
    assert run_shards(run, "teacher_cache", shards, result_storage(store), tokens=tokens) == 12  # every chunk
    sharded = execute(STAGES["teacher_cache"], run.context("teacher_cache"), tokens=tokens)
    assert files(tmp_path / "ray", sharded.path) == files(tmp_path / "one", single.path)
    assert sharded.model_dump(exclude={"path"}) == single.model_dump(exclude={"path"})


@pytest.mark.usefixtures("prefect_harness")
def test_a_shard_whose_worker_is_killed_is_retried_and_the_cache_verifies(tiny_teacher, tmp_path):
    """SIGKILL to the Ray worker running the first train shard, as soon as it runs: Ray runs the task again on
    another worker, every chunk gets written, and the finished cache is the single process's, checksums included."""
    import threading

    import psutil

    from distill.stage import verify_stage
    from tasks.result_storage import result_storage
    from tasks.shards import run_shards

    single, run, store, tokens, shards = cache_on_one_process_and_ray_shards(tiny_teacher, tmp_path)
    killed, done = [], threading.Event()

    def kill_first_train_shard():  # Ray titles a worker's process with the task it runs
        while not done.is_set() and not killed:
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if any("teacher_cache[train-0-4]" in part for part in proc.info["cmdline"] or []):
                    proc.kill()
                    killed.append(proc.info["pid"])
                    break
            done.wait(0.05)

    killer = threading.Thread(target=kill_first_train_shard)
    killer.start()
    try:
        written = run_shards(run, "teacher_cache", shards, result_storage(store), tokens=tokens)
    finally:
        done.set()
        killer.join()
    assert killed, "the shard's worker was never seen running"
    assert written >= 1
    finished = execute(STAGES["teacher_cache"], run.context("teacher_cache"), tokens=tokens)
    assert files(tmp_path / "ray", finished.path) == files(tmp_path / "one", single.path)
    assert verify_stage(STAGES["teacher_cache"], run.context("teacher_cache")) == ("intact", [])


@pytest.mark.parametrize("flow,stages,workers", [
    ("self-distill", ["tokenize", "self_distill"], RAY),
    ("self-distill", ["tokenize", "self_distill"], SHARDED),
    ("superposition-distill", ["tokenize", "teacher_cache", "superposition"], RAY)],
    ids=["self-distill-ddp", "self-distill-fsdp2", "superposition-ddp"])
def test_training_on_two_ray_workers_is_the_single_process_run(tiny_teacher, tmp_path, flow, stages, workers):
    """DDP, and FSDP2 (each worker holding half of every parameter, W included, and of dW's optimiser state)."""
    steps = {"train.steps": 6, "train.checkpoint_every": 3, "self_distill.steps": 6}
    run, store = planned(tiny_teacher, tmp_path / "one", flow, **steps)
    one = trained(run, *stages)
    run, ray_store = planned(tiny_teacher, tmp_path / "ray", flow, **steps, **workers)
    two = trained(run, *stages)
    assert two.path == one.path  # the same run: the backend is in no fingerprint
    check_same_run(store, one, ray_store, two)


def check_same_run(store, one, other_store, other):
    losses = [[h["loss"] for h in s.read_json(m.history)] for s, m in ((store, one), (other_store, other))]
    assert losses[0] == pytest.approx(losses[1], rel=LOSS_RTOL, abs=LOSS_ATOL)
    weights = [read_tensors(s, m.weights) for s, m in ((store, one), (other_store, other))]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=WEIGHT_ATOL, msg=name)


@pytest.mark.parametrize("first,then", [(RAY, {}), ({}, RAY), (SHARDED, {}), ({}, SHARDED)],
                         ids=["2-workers-then-1", "1-worker-then-2", "2-sharded-then-1", "1-then-2-sharded"])
def test_a_run_checkpointed_by_one_worker_count_resumes_with_the_other(tiny_teacher, tmp_path, first, then):
    """The run is trained to its end, then wound back to its step-3 checkpoint and finished with the other worker
    count: the same weights as an uninterrupted run."""
    steps = {"self_distill.steps": 6, "train.checkpoint_every": 3, "train.keep_checkpoints": 2}
    run, store = planned(tiny_teacher, tmp_path / "straight", **steps)
    straight = trained(run, "tokenize", "self_distill")
    run, store2 = planned(tiny_teacher, tmp_path / "switched", **steps, **first)
    done = trained(run, "tokenize", "self_distill")
    checkpoints = layout.checkpoints_dir(done.path)
    shutil.rmtree(tmp_path / "switched" / checkpoints / "step-6")  # as if killed after step 3's checkpoint
    for name in ("_COMPLETE.json", "weights.safetensors", "history.json"):
        (tmp_path / "switched" / done.path / name).unlink()
    run, store2 = planned(tiny_teacher, tmp_path / "switched", **steps, **then)
    resumed = trained(run, "tokenize", "self_distill")
    check_same_run(store, straight, store2, resumed)


def test_bad_ray_settings_are_refused_before_any_work(tiny_teacher, tmp_path):
    from ray.cluster_utils import Cluster

    from distill.config import ConfigError

    with pytest.raises(ConfigError, match="compute.ray.workers 3 do not divide train.batch_size 4 and head.batch_size"):
        planned(tiny_teacher, tmp_path, "superposition-distill", **{**RAY, "compute.ray.workers": 3})
    with pytest.raises(ConfigError, match="compute.shard_params shards the self-distilled teacher's parameters; the "
                                          "superposition student and its head are small and train with DDP"):
        planned(tiny_teacher, tmp_path, "superposition-distill", **SHARDED)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)  # a second machine, as Ray sees it
    try:
        overrides = {**RAY, "compute.ray.address": cluster.address}
        with pytest.raises(ConfigError, match=f"storage.root 'artifacts/x' is a relative local path, which the 2 "
                                              f"machines of the Ray cluster at {cluster.address} cannot share"):
            plan_run("self-distill", TINY, {**tiny_overrides(tiny_teacher, "artifacts/x"), **overrides},
                     logging.getLogger())
        planned(tiny_teacher, tmp_path, **overrides)  # an absolute path: one every machine may mount
    finally:
        cluster.shutdown()
    assert not (tmp_path / "tokenize").exists()  # nothing ran


def test_a_killed_training_worker_fails_the_stage_naming_the_checkpoint_a_rerun_resumes_from(tiny_teacher, tmp_path):
    import re
    import signal
    import subprocess
    import threading
    import time

    from distill.loop import TrainingFailed
    from storage import checkpoints

    steps = {"self_distill.steps": 100, "train.checkpoint_every": 5, "train.eval_every": 1000}
    run, store = planned(tiny_teacher, tmp_path, **steps, **RAY)
    tokens = trained(run, "tokenize")
    outcome = {}

    def train():
        try:
            execute(STAGES["self_distill"], run.context("self_distill"), tokens=tokens)
        except BaseException as exc:  # reported below, not lost in the thread
            outcome["error"] = exc

    thread = threading.Thread(target=train)
    thread.start()
    directory = layout.checkpoints_dir(run.stages["self_distill"].path)
    deadline = time.monotonic() + 300
    while checkpoints.latest_checkpoint(store, directory) is None:
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
    assert workers, "no Ray Train worker process found"
    subprocess.run(["kill", f"-{signal.SIGKILL}", workers[-1]], check=True)  # one rank's machine lost
    thread.join(300)
    error = outcome.get("error")
    assert isinstance(error, TrainingFailed), error
    latest = checkpoints.latest_checkpoint(store, directory)
    assert re.search(rf"self_distill: a training worker failed \(rank \d: .*\); rerun to resume from "
                     rf"{re.escape(latest)}$", str(error)), error
    killed_at = layout.checkpoint_step(latest)
    assert 0 < killed_at < 100 and not store.is_complete(run.stages["self_distill"].path)
    run, _ = planned(tiny_teacher, tmp_path, **steps)  # the rerun, on one process: from that checkpoint on
    done = execute(STAGES["self_distill"], run.context("self_distill"), tokens=tokens)
    assert [h["step"] for h in store.read_json(done.history)] == list(range(1, 101))
