"""A stage's shards as Prefect tasks mapped onto a Ray cluster through Prefect's own integration (prefect-ray's
``RayTaskRunner``), each with the CPUs and GPUs ``compute.ray`` asks for. Each shard task returns a number (the
chunks it wrote), never tensors. A shard whose worker dies is retried; whatever is still missing after that, the
stage itself computes when it runs next, so no shard's failure can leave a stage that looks finished."""

from __future__ import annotations

from prefect import flow, task

from distill.plan import Run
from distill.stage import Manifest, Shard
from distill.stages import STAGES
from storage import layout

from .progress import PrefectReporter


def _shard_key(_context, parameters: dict) -> str:
    """The stage's directory and the shard's range: never the run id, so another run finds finished shards."""
    run = parameters["run"]
    return layout.prefect_result(f"{run.stages[parameters['name']].path}/{parameters['shard'].name}")


@task(persist_result=True, result_serializer="json", cache_result_in_memory=False, cache_key_fn=_shard_key,
      retries=2, retry_delay_seconds=5)
def shard_task(run: Run, name: str, shard: Shard, inputs: dict[str, Manifest | None]) -> int:
    return STAGES[name].run_shard(run.context(name, PrefectReporter()), shard, **inputs)


@flow(validate_parameters=False)  # run is the planned Run, as the parent flow has it: nothing to re-validate
def shards_flow(run: Run, name: str, shards: list[Shard], inputs: dict[str, Manifest | None], result_storage) -> int:
    from prefect_ray.context import remote_options

    ray = run.config.compute.ray
    resources = {"num_cpus": ray.cpus_per_worker, **({"num_gpus": ray.gpus_per_worker} if ray.gpus_per_worker else {})}
    # a shard whose worker process dies (killed, out of memory, its machine lost) runs again on another worker:
    # Ray's retries, as Prefect's own retries run inside the worker that died
    with remote_options(**resources, max_retries=3):
        # run travels as it is: prefect-ray hands a quoted value to the worker as a bare tuple
        futures = [shard_task.with_options(name=f"{name}[{shard.name}]", result_storage=result_storage,
                                           refresh_cache=True).submit(run, name, shard, inputs)
                   for shard in shards]
    return sum(future.result() for future in futures)


def run_shards(run: Run, name: str, shards: list[Shard], result_storage, **inputs: Manifest | None) -> int:
    """Every shard of stage ``name`` at once on the Ray cluster of ``compute.ray`` (a local instance sized to
    ``workers`` x ``cpus_per_worker`` when no address is set); the chunks they wrote."""
    from prefect_ray import RayTaskRunner

    ray = run.config.compute.ray
    if ray.address is None:  # a local instance with room for the workers, and no more
        init = {"num_cpus": int(ray.workers * ray.cpus_per_worker) or 1,
                "num_gpus": int(ray.workers * ray.gpus_per_worker)}
    else:  # prefect-ray takes "auto" for "start a local instance": say it to ray.init itself
        init = {"address": "auto"} if ray.address == "auto" else {}
    runner = RayTaskRunner(address=None if ray.address == "auto" else ray.address, init_kwargs=init)
    return shards_flow.with_options(name=f"{name} shards", task_runner=runner)(run, name, shards, inputs,
                                                                                result_storage)
