"""What a run will do, decided before any work starts.

``plan_run`` resolves the configuration once (a Hub dataset's and a Hub teacher's revisions pinned to the commits
they name now), checks it against the teacher's config and tokenizer (no weights are loaded: a bad value fails in
seconds, naming the field), and gives every stage of the flow its fingerprint and directory. Fingerprints chain:
each stage's hashes its own settings and the fingerprint of the stage before it, so a change upstream changes
everything downstream, and an identical configuration finds yesterday's artifacts. ``stage_states`` says what a
run would do at each stage now (``python -m flows plan``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from storage import ArtifactStore, layout

from .config import ConfigError, PipelineConfig, load_config
from .data import pin_dataset_revision, unknown_dataset_version
from .progress import Reporter
from .stage import Context, Preflight, finished
from .stages import STAGES
from .teacher import Teacher, TeacherFacts

FLOWS = ("superposition-distill", "self-distill")


def flow_stages(cfg: PipelineConfig, flow: str) -> list[str]:
    """The stages of ``flow`` in order; each one's fingerprint chains onto the one before it."""
    if flow == "superposition-distill":
        return ["tokenize", "teacher_cache", "superposition", "lm_head", "evaluate", "export"]
    if flow == "self-distill":
        cached = ["teacher_cache"] if cfg.self_distill.teacher_signal == "cache" else []
        return ["tokenize", *cached, "self_distill", "evaluate", "export"]
    raise ConfigError(f"unknown flow {flow!r}: choose one of {', '.join(FLOWS)}")


class PlannedStage(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    fingerprint: str
    path: str


class Run(BaseModel):
    """One run of a flow, as planned: the resolved configuration and every stage's fingerprint and directory. The
    flow hands it to each task; nothing in it is re-read or re-validated there."""

    model_config = ConfigDict(frozen=True)

    flow: str
    name: str  # <config name>-<flow>-<the training stage's fingerprint>
    config: PipelineConfig
    stages: dict[str, PlannedStage]

    @property
    def fingerprints(self) -> dict[str, str]:
        return {name: stage.fingerprint for name, stage in self.stages.items()}

    def context(self, name: str, reporter: Reporter | None = None) -> Context:
        """What stage ``name`` runs with: the store opened unchecked (the plan checked it), a ``Teacher`` of its
        own (its parts loaded at most once in this stage's process)."""
        stage = self.stages[name]
        return Context(config=self.config, store=open_store(self.config, check=False),
                       teacher=Teacher(self.config.teacher), reporter=reporter or Reporter(), path=stage.path,
                       fingerprint=stage.fingerprint, fingerprints=self.fingerprints)


def open_store(cfg: PipelineConfig, check: bool = True) -> ArtifactStore:
    """The run's artifact store; ``check`` probes it first (on S3: the endpoint, credentials and bucket)."""
    return ArtifactStore(cfg.resolved_root(), storage_options=cfg.storage.storage_options or None, check=check)


def preflight(cfg: PipelineConfig, flow: str, teacher: Teacher | None = None) -> TeacherFacts:
    """Check ``cfg`` against the teacher's config and tokenizer and every stage of ``flow``; raise ``ConfigError``
    naming the field. Returns what the fingerprints need to know of the teacher."""
    names = flow_stages(cfg, flow)
    teacher = teacher or Teacher(cfg.teacher)
    if cfg.teacher.revision is not None and Path(teacher.source).is_dir():
        raise ConfigError(f"teacher.revision {cfg.teacher.revision!r} names a Hub revision, but teacher.name_or_path "
                          f"{cfg.teacher.name_or_path!r} is a local directory, which has none (its files are the "
                          "teacher, fingerprinted by content); remove teacher.revision")
    facts = teacher.facts()
    if facts.max_positions is not None and cfg.data.seq_len > facts.max_positions:
        raise ConfigError(f"data.seq_len {cfg.data.seq_len} exceeds the teacher's maximum positions "
                          f"({facts.max_positions}); use data.seq_len <= {facts.max_positions}")
    if len(teacher.tokenizer) > facts.vocab_size:  # token ids past the embedding: an IndexError in training
        raise ConfigError(f"the teacher's tokenizer has {len(teacher.tokenizer)} tokens but its model only "
                          f"{facts.vocab_size} embeddings (teacher.name_or_path {cfg.teacher.name_or_path!r}): "
                          "tokens were added to the tokenizer without resizing the model; use the tokenizer the "
                          "model was saved with, or resize its embeddings (model.resize_token_embeddings) and save it")
    pre = Preflight(cfg, teacher, facts, flow)
    for name in names:
        STAGES[name].check(pre)
    if cfg.compute.shard_params and "self_distill" not in names:
        raise ConfigError("compute.shard_params shards the self-distilled teacher's parameters; the superposition "
                          "student and its head are small and train with DDP: set compute.shard_params: false")
    if cfg.compute.backend == "ray":
        check_ray(cfg, names)
    return facts


def check_ray(cfg: PipelineConfig, stages: list[str]) -> None:
    """A Ray backend can run: Ray and prefect-ray installed, every batch splits evenly over the workers, and the
    workers can reach the artifact store (a cluster of several machines cannot share a relative local path)."""
    import importlib.util

    missing = [name for name in ("ray", "prefect_ray") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"compute.backend: ray needs {' and '.join(missing)}: pip install 'bitnet-distill[ray]', or "
                          "set compute.backend: local")
    workers = cfg.compute.ray.workers
    batches = {"train.batch_size": cfg.train.batch_size, "head.batch_size": cfg.head.batch_size}
    uneven = [f"{field} {size}" for field, size in batches.items() if size % workers
              and (field == "train.batch_size" or "lm_head" in stages)]
    if uneven:
        raise ConfigError(f"compute.ray.workers {workers} do not divide {' and '.join(uneven)}: each worker trains on "
                          "an equal slice of every batch; choose a batch size that is a multiple of the workers")
    root = cfg.storage.root
    if cfg.compute.ray.address is not None and "://" not in root and not Path(root).expanduser().is_absolute():
        nodes = _ray_nodes(cfg.compute.ray.address)
        if nodes > 1:
            raise ConfigError(f"storage.root {root!r} is a relative local path, which the {nodes} machines of the Ray "
                              f"cluster at {cfg.compute.ray.address} cannot share: use s3://bucket/prefix, or an "
                              "absolute path that every machine mounts")


def _ray_nodes(address: str) -> int:
    """How many machines (alive nodes) the Ray cluster at ``address`` has."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False)
    try:
        return sum(1 for node in ray.nodes() if node.get("Alive"))
    finally:
        if started:
            ray.shutdown()


def make_plan(cfg: PipelineConfig, flow: str, teacher: TeacherFacts) -> Run:
    """Every stage of ``flow`` with its fingerprint and directory."""
    stages: dict[str, PlannedStage] = {}
    upstream = None
    run = None
    for name in flow_stages(cfg, flow):
        stage = STAGES[name]
        fingerprint = stage.fingerprint(cfg, teacher, upstream)
        if stage.shared:
            path = layout.shared_stage_dir(name, fingerprint)
        else:
            run = run or f"{cfg.name}-{flow}-{layout.short(fingerprint)}"  # named by its training stage
            path = layout.run_stage_dir(run, name, fingerprint)
        stages[name] = PlannedStage(name=name, fingerprint=fingerprint, path=path)
        upstream = fingerprint
    return Run(flow=flow, name=run, config=cfg, stages=stages)


def plan_run(flow: str, config: str | PipelineConfig, overrides: dict | None, log) -> tuple[Run, ArtifactStore]:
    """The run of ``flow`` on ``config`` (+ ``overrides``), checked against the teacher and the artifact store; a
    bad configuration fails here, before any work. ``log`` (a logger) says which commits the revisions named."""
    cfg = load_config(config, overrides)
    cfg = cfg.model_copy(update={"data": _pinned_data(cfg, log)})
    teacher = Teacher(cfg.teacher)
    facts = preflight(cfg, flow, teacher)
    store = open_store(cfg)  # an unreachable endpoint, a missing bucket or credentials fail here
    commit = facts.identity.get("commit")
    if commit and commit != cfg.teacher.revision:
        # every stage loads the teacher at the commit the fingerprints name, even if the revision moves upstream
        # while the run goes on (the cache, training, evaluation and export each load it)
        cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"revision": commit})})
    return make_plan(cfg, flow, facts), store


def _pinned_data(cfg: PipelineConfig, log):
    """``data`` with a Hub dataset's revision resolved to the commit it names now; the log says which, or why it
    is unknown."""
    pinned = pin_dataset_revision(cfg.data)
    if pinned.revision != cfg.data.revision:
        log.info("data: %s revision %s is commit %s", cfg.data.dataset, cfg.data.revision or "main", pinned.revision)
    elif unknown_dataset_version(pinned):
        log.warning("data: the commit of %s revision %s is unknown (the Hub did not say: offline, no access or no such "
                    "dataset; nor does the local Hugging Face cache): its token shards are fingerprinted by name and "
                    "revision only, so a run after an upstream change would reuse them; set data.revision to a commit "
                    "to pin one version", cfg.data.dataset, cfg.data.revision or "main")
    return pinned


def stage_states(run: Run, store: ArtifactStore) -> dict[str, str]:
    """What a run would do at each stage now, read from the store without changing it: reuse it (finished), resume
    it (teacher-cache chunks or a training checkpoint already there) or run it."""
    states = {}
    for name, planned in run.stages.items():
        stage = STAGES[name]
        if finished(stage, store, planned.path) is not None:
            states[name] = "finished: reused"
        else:
            states[name] = stage.resumes(run.config, store, planned.path) or "runs"
    return states
