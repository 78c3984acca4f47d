"""What a run will do, decided before any work starts.

``preflight`` checks the configuration against the teacher's config and tokenizer (no weights are loaded), so a
bad value fails in seconds with a message naming the field. ``make_plan`` gives every stage its fingerprint
(its own configuration + its upstream fingerprint + the teacher's identity) and its artifact path: a change
upstream changes everything downstream, and an identical configuration finds yesterday's artifacts.
``stage_states`` says which of them a run would reuse, resume or run (``python -m flows plan``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from storage import ArtifactStore, checkpoints, fingerprint, layout, model_identity, tokenizer_identity
from storage.cache_spec import recorded_chunks

from .artifacts import stage_finished
from .config import ConfigError, OptimConfig, PipelineConfig
from .data import check_source, files_identity, local_dataset_identity, special_ids
from .optim import check_optimizer
from .teacher import (check_4bit_loading, load_teacher_config, load_tokenizer, model_source, resolve_device,
                      resolve_dtype, resolve_layers)
from .train_self import check_cache_holds_teacher_signal

FLOWS = ("superposition-distill", "self-distill")


@dataclass
class TeacherFacts:
    """What the plan needs to know about the teacher, read from its config and tokenizer."""

    identity: dict
    tokenizer_identity: dict  # the tokenizer files only: retrained weights keep the token shards
    compute_dtype: str
    num_hidden_layers: int
    max_positions: int | None


def uses_teacher_cache(cfg: PipelineConfig, flow: str) -> bool:
    """Whether ``flow`` runs the cache stage: superposition always, self-distillation when it reads its teacher
    signal from the cache instead of the model's own teacher mode."""
    return flow == "superposition-distill" or cfg.self_distill.teacher_signal == "cache"


def open_store(cfg: PipelineConfig, check: bool = True) -> ArtifactStore:
    """The run's artifact store; ``check`` probes it first (on S3: the endpoint, credentials and bucket)."""
    return ArtifactStore(cfg.resolved_root(), storage_options=cfg.storage.storage_options or None, check=check)


def preflight(cfg: PipelineConfig, flow: str) -> TeacherFacts:
    """Validate ``cfg`` against the teacher; raise ``ConfigError`` naming the field."""
    if flow not in FLOWS:
        raise ConfigError(f"unknown flow {flow!r}: choose one of {', '.join(FLOWS)}")
    source = model_source(cfg.teacher.name_or_path)  # a local directory, or the Hub name as given
    if cfg.teacher.revision is not None and Path(source).is_dir():
        raise ConfigError(f"teacher.revision {cfg.teacher.revision!r} names a Hub revision, but teacher.name_or_path "
                          f"{cfg.teacher.name_or_path!r} is a local directory, which has none (its files are the "
                          "teacher, fingerprinted by content); remove teacher.revision")
    config = load_teacher_config(cfg.teacher)
    tokenizer = load_tokenizer(cfg.teacher)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    device = resolve_device(cfg.teacher.device)
    facts = TeacherFacts(
        identity=model_identity(source, revision=cfg.teacher.revision),
        tokenizer_identity=tokenizer_identity(source, revision=cfg.teacher.revision),
        compute_dtype=str(resolve_dtype(cfg.teacher.dtype, device)).removeprefix("torch."),
        num_hidden_layers=text_config.num_hidden_layers,
        max_positions=getattr(text_config, "max_position_embeddings", None),
    )
    if facts.max_positions is not None and cfg.data.seq_len > facts.max_positions:
        raise ConfigError(f"data.seq_len {cfg.data.seq_len} exceeds the teacher's maximum positions "
                          f"({facts.max_positions}); use data.seq_len <= {facts.max_positions}")
    check_4bit_loading(cfg.teacher)
    check_optimizer(cfg.train, device)
    resolve_layers(cfg.cache.layers, facts.num_hidden_layers)
    if flow == "self-distill" and cfg.self_distill.hidden_layers != "all":
        try:
            resolve_layers(cfg.self_distill.hidden_layers, facts.num_hidden_layers)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("cache.layers", "self_distill.hidden_layers")) from None
    if flow == "self-distill":
        from .export import check_exportable

        check_exportable(cfg.teacher, config)
    if flow == "self-distill" and cfg.self_distill.teacher_signal == "cache":
        check_cache_holds_teacher_signal(cfg, facts.num_hidden_layers)
    if flow == "superposition-distill":
        if len(cfg.cache.layers) > 1:
            raise ConfigError(f"cache.layers {cfg.cache.layers}: the superposition student reconstructs one teacher "
                              "layer; list only that one (e.g. cache.layers: [-1])")
        if cfg.head.topk_kl_weight and not cfg.cache.topk:
            raise ConfigError("head.topk_kl_weight > 0 needs cached top-k teacher logits: set cache.topk > 0 "
                              "(e.g. 64) or head.topk_kl_weight: 0")
    if uses_teacher_cache(cfg, flow) and cfg.cache.topk > text_config.vocab_size:
        raise ConfigError(f"cache.topk {cfg.cache.topk} exceeds the teacher's {text_config.vocab_size} logits per "
                          f"token; use cache.topk <= {text_config.vocab_size} (the quickstart caches 32), or 0")
    if len(tokenizer) > text_config.vocab_size:  # token ids past the embedding: an IndexError in training
        raise ConfigError(f"the teacher's tokenizer has {len(tokenizer)} tokens but its model only "
                          f"{text_config.vocab_size} embeddings (teacher.name_or_path {cfg.teacher.name_or_path!r}): "
                          "tokens were added to the tokenizer without resizing the model; use the tokenizer the "
                          "model was saved with, or resize its embeddings (model.resize_token_embeddings) and save it")
    check_source(cfg.data)
    special_ids(tokenizer, cfg.data.packing)  # raises when the tokenizer lacks what data.packing needs
    return facts


def pin_teacher_revision(cfg: PipelineConfig, teacher: TeacherFacts) -> PipelineConfig:
    """``cfg`` with a Hub teacher's revision replaced by the commit its identity (and so every fingerprint) names, so
    that each stage of the run loads those weights even if the revision moves upstream while the run goes on (the
    cache, training, evaluation and export each load the teacher). A local teacher is unchanged."""
    commit = teacher.identity.get("commit")
    if not commit or commit == cfg.teacher.revision:
        return cfg
    return cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"revision": commit})})


@dataclass
class Stage:
    name: str
    fingerprint: str
    path: str
    checkpoint_run: str | None = None  # training stages: where latest_checkpoint looks

    def as_dict(self) -> dict:
        # the Prefect result lives inside the stage's own directory (see tasks/common.py)
        return {"name": self.name, "fingerprint": self.fingerprint, "path": self.path,
                "cache_key": f"{self.path}/prefect-result.json", "checkpoint_run": self.checkpoint_run}


# How often a run checkpoints and how many checkpoints it keeps change neither its weights nor its history (a
# resumed run equals an uninterrupted one bit for bit: tests/pipeline/test_resume.py). They are hashed at their
# defaults, so changing them reuses a finished run, and the fingerprints of runs made before this rule stay the same.
_NOT_FINGERPRINTED = ("checkpoint_every", "keep_checkpoints")


def _optim_settings(optim: dict) -> dict:
    """The optimiser settings as a training fingerprint sees them."""
    settings = {**optim, **{k: OptimConfig.model_fields[k].default for k in _NOT_FINGERPRINTED}}
    # train.optimizer came after runs existed: its default is left out so that their fingerprints stay
    if settings.get("optimizer") == "adamw":
        del settings["optimizer"]
    return settings


def make_plan(cfg: PipelineConfig, flow: str, teacher: TeacherFacts) -> dict[str, dict]:
    """``{stage: {name, fingerprint, path, cache_key, checkpoint_run}}`` for every stage of ``flow``, and under
    ``"run"`` the run's name and directory."""
    d = cfg.model_dump()
    d["train"] = _optim_settings(d["train"])
    stages: dict[str, Stage] = {}

    def add(name: str, own: dict, upstream: str | None) -> str:
        fp = fingerprint(own, upstream)
        stages[name] = Stage(name, fp, "")
        return fp

    # data.revision came after runs existed. Where it stays unset (the built-in corpus, data.files, a local
    # directory, and a Hub dataset whose commit is unknown) the fingerprints stay theirs; a Hub dataset's runs,
    # pinned to a commit since, rebuild once: they had been fingerprinted by name only
    if d["data"]["revision"] is None:
        del d["data"]["revision"]
    tokens_own = {"data": d["data"], "tokenizer": teacher.tokenizer_identity}
    # local data by content, not only by name; a Hub dataset by the commit data.revision names (pin_dataset_revision)
    if cfg.data.files:
        tokens_own["files"] = files_identity(cfg.data)
    if (local := local_dataset_identity(cfg.data)) is not None:
        tokens_own["dataset_files"] = local
    tokens = add("tokenize", tokens_own, None)
    stages["tokenize"].path = layout.tokens_dir(tokens)
    loaded = {"teacher": teacher.identity, "compute_dtype": teacher.compute_dtype}  # what its outputs depend on
    # cache.eval_samples is hashed under the name its value had before it was a setting of its own (eval.max_rows),
    # so that the caches and runs made then keep their fingerprints where the two are equal
    cache_settings = {k: v for k, v in d["cache"].items() if k != "eval_samples"}
    cache_own = {**loaded, "load_in_4bit": cfg.teacher.load_in_4bit, "cache": cache_settings,
                 "eval_rows": cfg.cache.eval_samples}
    upstream = tokens
    if uses_teacher_cache(cfg, flow):
        upstream = add("cache_teacher", cache_own, tokens)
        stages["cache_teacher"].path = layout.teacher_cache_dir(upstream)
    if flow == "superposition-distill":
        train = add("train", {"student": d["student"], "train": d["train"], "seed": cfg.seed}, upstream)
        run = f"{cfg.name}-superposition-{layout.short(train)}"
        stages["train"].path = layout.run_dir(run) + "/train"
        last = add("lm_head", {"head": d["head"]}, train)
        stages["lm_head"].checkpoint_run = layout.lm_head_run(run, last)
        stages["lm_head"].path = layout.run_dir(stages["lm_head"].checkpoint_run)
    else:
        # self_distill.steps and .min_lr_ratio reach the fingerprint resolved into the optimiser settings; left out
        # of the section itself so that adding the fields kept the fingerprints of earlier runs.
        # .activation_checkpointing changes memory, not results (the same gradients bit for bit): a run may resume
        # with it switched
        own = {k: v for k, v in d["self_distill"].items()
               if k not in ("steps", "min_lr_ratio", "activation_checkpointing")}
        optim = _optim_settings(cfg.self_distill_optim().model_dump())
        train = add("train", {**loaded, "self_distill": own, "train": optim, "seed": cfg.seed}, upstream)
        run = f"{cfg.name}-self-distill-{layout.short(train)}"
        stages["train"].path = layout.run_dir(run) + "/train"
        last = train
    stages["train"].checkpoint_run = run
    evaluated = add("evaluate", {"eval": d["eval"]}, last)
    stages["evaluate"].path = layout.eval_dir(run, evaluated)
    exported = add("export", {"format": 2}, evaluated)  # 2: the model card carries Hub metadata (2026-12-05)
    stages["export"].path = layout.student_dir(run, exported)
    plan = {name: stage.as_dict() for name, stage in stages.items()}
    plan["run"] = {"name": run, "path": layout.run_dir(run)}
    return plan


def stage_states(cfg: PipelineConfig, flow: str, store: ArtifactStore, plan: dict[str, dict]) -> dict[str, str]:
    """What a run of ``plan`` would do at each stage, read from the store without changing it: reuse the stage
    (finished), resume it (teacher-cache chunks or a training checkpoint already there) or run it."""
    steps = {"train": cfg.train.steps if flow == "superposition-distill" else cfg.self_distill_optim().steps,
             "lm_head": cfg.head.steps}
    return {name: _stage_state(store, stage, steps.get(name)) for name, stage in plan.items() if "fingerprint" in stage}


def _stage_state(store: ArtifactStore, stage: dict, steps: int | None) -> str:
    path = stage["path"]
    if stage_finished(store, path):
        return "finished: reused"
    if stage["name"] == "cache_teacher":
        cached = {split: len(recorded_chunks(store, f"{path}/{split}")) for split in ("train", "eval")}
        if any(cached.values()):
            return "resumes: " + ", ".join(f"{n} {split} chunks cached" for split, n in cached.items())
    if stage["checkpoint_run"] and (latest := checkpoints.latest_checkpoint(store, stage["checkpoint_run"])):
        return f"resumes from step {layout.checkpoint_step(latest)} of {steps}"
    return "runs"
