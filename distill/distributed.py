"""Training on N workers: the training stages' one entry point, ``fit``, on one process, on a Ray cluster through
Ray Train's ``TorchTrainer``, or under ``torchrun``.

Every worker builds the stage's trainable and runs the same loop (``distill.loop.train``) under torch.distributed:
each rank trains on its slice of every global batch and the gradients are averaged before each step, so the run is
the single process's run (its global batch, learning-rate schedule and loss curve), whatever the worker count, and
a checkpoint written by 2 workers resumes with 1 and the other way round. Rank 0 writes the checkpoints; the stage
takes its trained tensors from the final one.

    torchrun --nproc_per_node 2 -m distill.distributed self-distill --config quickstart

trains the flow's training stage (and the stages before it, on rank 0) on 2 processes without Ray; a run of the
flow afterwards reuses it and evaluates and exports the student.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field

import torch

from storage import checkpoints, layout

from .config import OptimConfig
from .loop import Trainable, TrainingFailed, process_group, train, trained_state
from .stage import Context, Manifest, Stage


@dataclass
class Built:
    """What a training stage's ``build`` hands to ``fit``: the trainable, its optimiser settings, and manifest
    fields known once it is built (how many layers were patched, ...)."""

    trainable: Trainable
    optim: OptimConfig
    extra: dict = field(default_factory=dict)
    description: str = "train"


def fit(ctx: Context, stage: Stage, **inputs: Manifest | None) -> tuple[list[dict], dict[str, torch.Tensor], dict]:
    """Train ``stage`` (a stage with ``build``): ``(loss history, trained tensors, manifest fields)``. On this
    process, or under the torch.distributed group this process is in (torchrun), or on ``compute.ray.workers`` Ray
    workers when ``compute.backend`` is ray."""
    if ctx.config.compute.backend == "ray" and process_group()[1] == 1:
        return _fit_on_ray(ctx, stage, inputs)
    built = stage.build(ctx, **inputs)
    history = train(built.trainable, built.optim, ctx.store, layout.checkpoints_dir(ctx.path), ctx.reporter,
                    ctx.device, built.description, ctx.lock)
    return history, trained_state(built.trainable), built.extra


def shard_params(dual, device: torch.device) -> int:
    """FSDP2 over this process group (``compute.shard_params``): every rank keeps 1/N of each parameter, the frozen
    W included, and of dW's gradients and optimiser state; a block's parameters are gathered whole for its forward
    and backward only, so the teacher mode computes with the exact W. One group per block, then the rest of the
    model (FSDP2 wants one dtype among a group's trainable parameters: dW's, whatever W's is). Returns how many
    blocks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    blocks = [block for name in dual.block_lists for block in dual.model.get_submodule(name)]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(dual.model, mesh=mesh)
    return len(blocks)


def _context_of(config, path: str, fingerprint: str) -> Context:
    """A stage's context rebuilt in a worker process: its own store and teacher."""
    from .plan import open_store
    from .teacher import Teacher

    return Context(config=config, store=open_store(config, check=False), teacher=Teacher(config.teacher), path=path,
                   fingerprint=fingerprint)


def _built_path(path: str) -> str:
    """Where rank 0 leaves the manifest fields its build found, for the stage's own process (beside the
    checkpoints: not one of the stage's outputs)."""
    return f"{layout.checkpoints_dir(path)}/built.json"


def _ray_worker(job: dict) -> None:
    """One Ray Train worker: torch.distributed is up (gloo on CPU, NCCL on GPU); train, rank 0 writing."""
    import ray.train

    from .stages import STAGES

    ctx = _context_of(job["config"], job["path"], job["fingerprint"])
    ctx.device = ray.train.torch.get_device()  # the GPU Ray gave this worker, or the CPU
    built = STAGES[job["stage"]].build(ctx, **job["inputs"])
    train(built.trainable, built.optim, ctx.store, layout.checkpoints_dir(ctx.path), ctx.reporter, ctx.device,
          built.description)
    if process_group()[0] == 0:
        ctx.store.write_json(_built_path(ctx.path), built.extra)


def _fit_on_ray(ctx: Context, stage: Stage, inputs: dict) -> tuple[list[dict], dict[str, torch.Tensor], dict]:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = ctx.config.compute.ray
    started = not ray.is_initialized()
    if started:  # joined (an address) or started here, sized to the workers (no address)
        resources = {} if cfg.address else {"num_cpus": int(cfg.workers * cfg.cpus_per_worker) or 1,
                                            "num_gpus": int(cfg.workers * cfg.gpus_per_worker)}
        ray.init(address=cfg.address, log_to_driver=False, **resources)
    checkpoint_dir = layout.checkpoints_dir(ctx.path)
    try:
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"config": ctx.config, "path": ctx.path, "fingerprint": ctx.fingerprint,
                               "stage": stage.name, "inputs": inputs},
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                         resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                               **({"GPU": cfg.gpus_per_worker}
                                                                  if cfg.gpus_per_worker else {})}),
            # Ray Train's own results stay in a temporary directory: the stage's checkpoints are in the store
            run_config=RunConfig(name=f"{stage.name}-{ctx.fingerprint}", storage_path=_ray_storage(),
                                 failure_config=FailureConfig(max_failures=0)))
        ctx.reporter.log(f"{stage.name}: training on {cfg.workers} Ray workers")
        trainer.fit()
    except Exception as exc:  # Ray Train's TrainingFailedError wraps the worker's error; its type varies by version
        latest = checkpoints.latest_checkpoint(ctx.store, checkpoint_dir)
        resume = f"rerun to resume from {latest}" if latest else "no checkpoint was written; rerun to start again"
        raise TrainingFailed(f"{stage.name}: a training worker failed ({_worker_error(exc)}); {resume}") from exc
    finally:
        if started:
            ray.shutdown()
    tensors, meta = checkpoints.load_checkpoint(ctx.store, checkpoints.latest_checkpoint(ctx.store, checkpoint_dir))
    state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    return meta["history"], state, ctx.store.read_json(_built_path(ctx.path))


def _ray_storage() -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), "bitnet-distill-ray")


def _worker_error(exc: BaseException) -> str:
    """Which rank failed and how, in one line: Ray Train's ``WorkerGroupError`` maps each failed rank to its error."""
    failures = getattr(exc, "worker_failures", None) or {}
    if failures:
        return "; ".join(f"rank {rank}: {_one_line(error)}" for rank, error in sorted(failures.items()))
    return _one_line(exc)


def _one_line(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc_per_node N -m distill.distributed <flow> --config ... [--set key=value]``: rank 0 runs the
    stages before training, then every rank trains the flow's training stage together."""
    from .config import parse_overrides
    from .plan import plan_run
    from .stage import execute
    from .stages import STAGES

    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m distill.distributed")
    parser.add_argument("flow", choices=["self-distill", "superposition-distill"])
    parser.add_argument("--config", "-c", default="quickstart")
    parser.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if "WORLD_SIZE" not in os.environ:
        print("error: run under torchrun (it sets WORLD_SIZE), e.g. torchrun --nproc_per_node 2 -m "
              "distill.distributed self-distill --config quickstart", file=sys.stderr)
        return 2
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        rank = torch.distributed.get_rank()
        run, _ = plan_run(args.flow, args.config, parse_overrides(args.set), logging.getLogger("distill"))
        names = list(run.stages)
        training = next(name for name in names if not STAGES[name].shared)  # the first of the run's own
        manifests: dict[str, Manifest] = {}
        for name in names[:names.index(training) + 1]:
            stage, ctx = STAGES[name], run.context(name)
            if torch.cuda.is_available():
                ctx.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            inputs = _inputs(name, manifests)
            if name == training and rank:
                fit(ctx, stage, **inputs)  # the other ranks train beside rank 0, which writes the stage
            elif rank == 0:
                manifests[name] = execute(stage, ctx, **inputs)
            torch.distributed.barrier()
            if rank:  # what rank 0 finished, for the next stage's inputs
                manifests[name] = stage.Manifest.model_validate(ctx.store.read_manifest(ctx.path)) \
                    if ctx.store.is_complete(ctx.path) else None
        if rank == 0:
            print(f"trained {training}: {manifests[training].path}")
    finally:
        torch.distributed.destroy_process_group()
    return 0


def _inputs(name: str, manifests: dict[str, Manifest]) -> dict[str, Manifest | None]:
    """The upstream manifests a training stage's run takes, by the names the flows pass them under."""
    wiring = {"teacher_cache": {"tokens": "tokenize"}, "self_distill": {"tokens": "tokenize", "cache": "teacher_cache"},
              "superposition": {"cache": "teacher_cache"}}
    return {arg: manifests.get(source) for arg, source in wiring.get(name, {}).items()}


if __name__ == "__main__":
    sys.exit(main())
