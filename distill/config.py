"""The one typed configuration of both flows, its YAML presets and dotted-key overrides.

A configuration is resolved as: preset (a name in ``configs/`` or a YAML path) -> overrides
(``{"train.steps": 20}``) -> validation. Everything is checked before any work starts, and errors name the field.
"""

from __future__ import annotations

import copy
import datetime
import re
from pathlib import Path
from typing import Any, Literal

import dataclasses

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bitnet import StudentConfig
from bitnet.layers import parse_delta

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = REPO_ROOT / "configs"


def operational(default: Any, **constraints) -> Any:
    """A field that changes how a stage runs, never what it produces (how often training checkpoints, ...): it is
    left out of every fingerprint, so changing it reuses finished work and resumes unfinished work."""
    return Field(default=default, json_schema_extra={"operational": True}, **constraints)


def added(default: Any, **constraints) -> Any:
    """A field added after artifacts were made with its default's behaviour: fingerprinted only when set to something
    else, so those artifacts keep their fingerprints (and are reused) while a new setting gets a fingerprint of its
    own."""
    return Field(default=default, json_schema_extra={"added": default}, **constraints)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, never silently ignored

    def fingerprinted(self, exclude: tuple[str, ...] = ()) -> dict:
        """The section as a stage's fingerprint sees it: every field but the operational ones, ``exclude`` and the
        ``added`` ones left at their default."""
        def kept(name: str, value: Any) -> bool:
            extra = type(self).model_fields[name].json_schema_extra or {}
            return not (name in exclude or extra.get("operational") or ("added" in extra and value == extra["added"]))

        return {name: value for name, value in self.model_dump(mode="json").items() if kept(name, value)}


class TeacherConfig(Section):
    name_or_path: str = "assets/quickstart-teacher"
    revision: str | None = None
    # auto: bf16 on a GPU that computes it natively (Ampere on), else fp32; float16 trains with loss scaling
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"  # auto: cuda, then mps, then cpu
    load_in_4bit: bool = False  # needs the optional bitsandbytes extra
    trust_remote_code: bool = False


class DataConfig(Section):
    builtin: Literal["stdlib"] | None = None  # the interpreter's standard library source (offline quickstart)
    dataset: str | None = None  # a Hugging Face dataset name...
    dataset_config: str | None = None
    # a branch, tag or commit of data.dataset (default: main); a run resolves it to the commit it names then, which
    # the token shards' fingerprint covers (a new upstream commit rebuilds them): pin a commit to keep one version
    revision: str | None = None
    split: str = "train"
    streaming: bool = False
    files: list[str] = Field(default_factory=list)  # ...or local .txt / .jsonl / .parquet files
    text_field: str | None = None  # default: "text", else instruction + response
    max_documents: int | None = Field(default=None, gt=0)
    min_chars: int = Field(default=16, ge=0)  # drop empty and very short documents
    seq_len: int = Field(default=128, gt=1)
    packing: Literal["pack", "pad"] = "pack"  # pack documents separated by EOS, or pad/truncate each one
    # held out by document hash; the built-in corpus keeps its own split (modules the quickstart teacher never saw)
    eval_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    max_train_rows: int | None = Field(default=None, gt=0)
    max_eval_rows: int | None = Field(default=None, gt=0)
    rows_per_shard: int = Field(default=4096, gt=0)

    @model_validator(mode="after")
    def _one_source(self):
        sources = [s for s in (self.builtin, self.dataset, self.files or None) if s]
        if len(sources) != 1:
            raise ValueError("set exactly one of data.builtin, data.dataset or data.files")
        if self.revision is not None and not self.dataset:
            raise ValueError(f"data.revision {self.revision!r} names a revision of a Hugging Face dataset; "
                             "data.builtin and data.files have none: remove data.revision")
        return self


class CacheConfig(Section):
    layers: list[int] = Field(default_factory=lambda: [-1])  # hidden_states indices; -1 = the last
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    codec: str = "zstd"  # hidden states (and token ids); docs/storage.md lists the codecs
    topk: int = Field(default=0, ge=0)  # the teacher's logits cached per position (0 = none), as cache.logits says
    # topk: its k largest logits, the KL renormalised over them (biased: the tail's mass is lost); sampled: k tokens
    # drawn from its distribution, stored as distinct tokens and their counts, whose KL is an unbiased estimate of the
    # full KL's gradient (Random-Sampling KD, arXiv 2503.16870; needs k <= 255 and KL at temperature 1)
    logits: Literal["topk", "sampled"] = added("topk")
    topk_codec: str = "blosc:lz4:bitshuffle"  # top-k values and indices (storage/cache_spec.py says why)
    batch_size: int = Field(default=8, gt=0)  # teacher forward batch = cache chunk size
    max_samples: int | None = Field(default=None, gt=0)
    # held-out rows cached for the held-out loss logged while training from the cache (the superposition student's
    # reconstruction, the LM head's with head.topk_kl_weight; 4 batches of them); the evaluate stage reads its rows
    # (eval.max_rows) from the token shards, so changing those rebuilds neither the cache nor the student
    eval_samples: int | None = Field(default=256, gt=0)

    @field_validator("codec", "topk_codec")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        from storage.cache_spec import compressors

        compressors(value)  # its ValueError names the codecs there are
        return value

    @model_validator(mode="after")
    def _sampled_counts(self):
        from storage.cache_spec import MAX_SAMPLED

        if self.logits == "sampled" and not 0 < self.topk <= MAX_SAMPLED:
            raise ValueError(f"cache.logits: sampled draws cache.topk tokens per position, stored with 8-bit counts: "
                             f"set cache.topk between 1 and {MAX_SAMPLED} (e.g. 32), not {self.topk}")
        return self


class OptimConfig(Section):
    steps: int = Field(default=500, gt=0)
    batch_size: int = Field(default=16, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    warmup_steps: int = Field(default=50, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)  # none on ternary latent weights by default
    # adamw8bit: torchao's AdamW8bit, both moments in 8 bits, a quarter of AdamW's state (docs/RESULTS.md, "Memory");
    # needs the optim8bit extra
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    grad_clip: float = Field(default=1.0, ge=0.0)
    eval_every: int = Field(default=100, gt=0)
    # a resumed run equals an uninterrupted one bit for bit (tests/pipeline/test_resume.py), wherever it checkpointed
    checkpoint_every: int = operational(100, gt=0)
    keep_checkpoints: int = operational(2, gt=0)
    autocast_bf16: bool = True  # on CUDA GPUs with native bf16 (compute capability 8.0 on) only


class SelfDistillConfig(Section):
    delta: str = "full"
    delta_dtype: Literal["float32", "bfloat16"] = "float32"
    # KL to the teacher alone by default: the student closest to its teacher. Cross-entropy on the data lowers
    # held-out perplexity on the teacher's own domain at the cost of that closeness (docs/RESULTS.md, "Loss terms").
    ce_weight: float = Field(default=0.0, ge=0.0)
    kl_weight: float = Field(default=1.0, ge=0.0)
    hidden_weight: float = Field(default=0.0, ge=0.0)
    magnitude_weight: float = Field(default=0.0, ge=0.0)
    temperature: float = Field(default=1.0, gt=0.0)
    hidden_layers: list[int] | Literal["all"] = "all"
    quant_warmup_steps: int = Field(default=0, ge=0)  # lambda warm-up of the quantizers (0 = off)
    teacher_signal: Literal["online", "cache"] = "online"
    lr: float | None = Field(default=None, gt=0)  # overrides train.lr: dW of a pretrained model wants a smaller one
    steps: int | None = Field(default=None, gt=0)  # overrides train.steps (the superposition flow keeps train.steps)
    # replaces train.min_lr_ratio: decay to zero. While the lr is not zero, latent weights near a rounding threshold
    # keep flipping their ternary code, and the student evaluated is wherever the last flips left it
    # (docs/RESULTS.md, "Self-distillation recipe")
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    # recompute each block's activations in backward instead of keeping them: the same gradients bit for bit, much
    # less memory at long sequences or large batches, one more forward pass of the blocks per step
    activation_checkpointing: bool = operational(False)

    @field_validator("delta")
    @classmethod
    def _delta_spec(cls, value: str) -> str:
        parse_delta(value)  # its ValueError says what is allowed
        return value

    @model_validator(mode="after")
    def _some_loss(self):
        if not (self.ce_weight or self.kl_weight or self.hidden_weight):
            raise ValueError("ce_weight, kl_weight and hidden_weight are all 0: nothing would train dW "
                             "(the default is kl_weight: 1)")
        if self.magnitude_weight and not self.hidden_weight:
            raise ValueError("magnitude_weight refines the hidden-state term: it needs hidden_weight > 0")
        return self


class SuperpositionConfig(Section):
    """How the superposition student starts and what it learns from besides the teacher's states (docs/RESULTS.md,
    "Superposition against its control")."""

    # random: from random weights; teacher: cut out of the teacher (its blocks evenly spaced, its residual stream's
    # principal directions, its most important heads and MLP channels: bitnet/student_init.py), and the
    # decompressor its inverse projection
    init: Literal["random", "teacher"] = "random"
    # training rows (the first of the cache's) the teacher runs on to rank what the student keeps (init: teacher)
    calibration_rows: int = Field(default=64, gt=0)
    # sparse KL to the cached teacher logits (cache.logits) through the student's own head, beside the
    # reconstruction (needs cache.topk > 0); the head then trains with the body, and LM-head retraining starts from it
    kl_weight: float = Field(default=0.0, ge=0.0)
    # the head that KL reads: the student's own, or the teacher's (frozen) applied to the decompressed states, which
    # then learn to be read as the teacher's are (only right for a teacher whose logits are its output embedding of
    # its last hidden state; the cache stage's log says when they are not); the student's head is not trained then
    kl_head: Literal["student", "teacher"] = added("student")
    # the inner teacher layers listed in cache.layers (besides the reconstructed, deepest one) are each reconstructed
    # from the student state matched with them through a decompressor: own (one per layer, each starting as its exact
    # inverse projection under init: teacher) or shared (the reconstructed layer's)
    projectors: Literal["own", "shared"] = added("own")


class HeadConfig(Section):
    steps: int = Field(default=200, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=16, gt=0)
    # train a separate head (the student's embeddings and blocks stay frozen); false retrains the tied embedding
    # matrix, as the reference does (needs student.tie_embeddings: true)
    untied: bool = True
    topk_kl_weight: float = Field(default=0.0, ge=0.0)  # sparse KL to the cached teacher logits (cache.logits)


class LmEvalConfig(Section):
    """Benchmark accuracy through EleutherAI's lm-evaluation-harness (the ``eval`` extra), off while ``tasks`` is
    empty. docs/pipeline.md, "Benchmark accuracy"."""

    # harness task names (hellaswag, arc_easy: their data comes from the Hub), task YAML files (relative: to the
    # working directory, then the repository), or the name of a task shipped in configs/lm_eval/ (stdlib_next_line)
    tasks: list[str] = Field(default_factory=list)
    num_fewshot: int | None = Field(default=None, ge=0)  # None: each task's own default (0 for most)
    limit: int | None = Field(default=None, gt=0)  # examples per task, the first N (None: all)
    batch_size: int = Field(default=8, gt=0)

    @field_validator("tasks", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        # "hellaswag,arc_easy", as the harness's own --tasks takes them
        return [t.strip() for t in value.split(",")] if isinstance(value, str) else value

    @field_validator("tasks")
    @classmethod
    def _named_once(cls, value: list[str]) -> list[str]:
        if any(not task.strip() for task in value):
            raise ValueError("a task name is blank: drop it (tasks: [] runs no benchmark)")
        if len(set(value)) != len(value):
            raise ValueError(f"a task is named twice in {value}: name each once")
        return value


class EvalConfig(Section):
    batch_size: int = Field(default=8, gt=0)
    max_rows: int | None = Field(default=256, gt=0)
    prompts: list[str] = Field(default_factory=lambda: ["Once upon a time", "The capital of France is",
                                                        "def fibonacci(n):"])
    max_new_tokens: int = Field(default=32, ge=0)
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig)

    @field_validator("prompts")
    @classmethod
    def _no_blank_prompt(cls, value: list[str]) -> list[str]:
        if any(not prompt.strip() for prompt in value):
            raise ValueError("a prompt is blank: generation needs at least one token to continue; drop it "
                             "(eval.prompts: [] samples nothing)")
        return value


class ExportConfig(Section):
    # the student as a GGUF file for llama.cpp beside the transformers export: TQ2_0 (2.06 bits per weight, llama.cpp's
    # faster ternary kernel) or TQ1_0 (1.69 bits), or none (docs/gguf.md)
    gguf: Literal["tq2_0", "tq1_0", "none"] = "tq2_0"
    gguf_embeddings: Literal["f16", "q8_0"] = "f16"  # the GGUF's token embeddings and output head


class StorageConfig(Section):
    root: str = "artifacts"  # a local path (relative to the repository) or s3://bucket/prefix
    storage_options: dict[str, Any] = Field(default_factory=dict)  # e.g. endpoint_url, key, secret for s3fs


class RayConfig(Section):
    # null: a local Ray instance sized to the workers; "auto": the cluster this machine joined (ray start);
    # "host:6379": a cluster's head, from a machine of the cluster; "ray://host:10001": through Ray Client
    address: str | None = None
    workers: int = Field(default=2, gt=0)  # cache shards run at once, and training processes
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)

    @field_validator("address")
    @classmethod
    def _known_address(cls, value: str | None) -> str | None:
        if value is not None and value != "auto" and not re.fullmatch(r"(ray://)?[^\s/:]+:\d+", value):
            raise ValueError(f"{value!r} is not a Ray address: use null (a local instance), auto (the cluster this "
                             "machine joined with ray start), host:6379 (the head's address) or ray://host:10001 "
                             "(Ray Client)")
        return value


class ComputeConfig(Section):
    """Where the stages compute. No stage's fingerprint includes it: the teacher cache is the same bytes and a
    training the same run on one process or on N workers, so a run may resume with another backend or worker count."""

    backend: Literal["local", "ray"] = "local"
    ray: RayConfig = Field(default_factory=RayConfig)
    # self-distillation on N workers with FSDP2 instead of DDP: each worker holds 1/N of every parameter (the frozen
    # W too) and of dW's gradients and optimiser state, for teachers whose dW and its AdamW state outgrow one device
    shard_params: bool = False


class PipelineConfig(Section):
    name: str = "run"
    seed: int = 0
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    data: DataConfig = Field(default_factory=lambda: DataConfig(builtin="stdlib"))
    cache: CacheConfig = Field(default_factory=CacheConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)  # bitnet's: the superposition student's shape
    train: OptimConfig = Field(default_factory=OptimConfig)
    self_distill: SelfDistillConfig = Field(default_factory=SelfDistillConfig)
    superposition: SuperpositionConfig = Field(default_factory=SuperpositionConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)

    @field_validator("name")
    @classmethod
    def _name_is_a_path_segment(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError("use letters, digits, '.', '_' and '-' (it names a directory)")
        return value

    @model_validator(mode="after")
    def _student_shape_from_the_pipeline(self):
        defaults = StudentConfig()
        given = [f"student.{name}" for name in ("vocab_size", "max_seq_len")
                 if getattr(self.student, name) != getattr(defaults, name)]
        if given:
            raise ValueError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} set by the pipeline (the "
                             "teacher's vocabulary, data.seq_len): remove it")
        return self

    @model_validator(mode="after")
    def _tied_head_needs_tied_embeddings(self):
        if not self.head.untied and not self.student.tie_embeddings:
            raise ValueError("head.untied: false retrains the student's tied embedding matrix, but "
                             "student.tie_embeddings is false (its head is a separate, untrained matrix): set "
                             "student.tie_embeddings: true, or keep head.untied: true (the default)")
        return self

    def self_distill_optim(self) -> OptimConfig:
        """The optimiser settings of the self-distillation flow (``train`` with ``self_distill.lr``, ``.steps`` and
        ``.min_lr_ratio``)."""
        sd = self.self_distill
        return self.train.model_copy(update={"lr": sd.lr or self.train.lr, "steps": sd.steps or self.train.steps,
                                             "min_lr_ratio": sd.min_lr_ratio})

    def head_optim(self) -> OptimConfig:
        """The optimiser settings of LM-head retraining (``train`` with the ``head`` section's values)."""
        h = self.head
        return self.train.model_copy(update={"steps": h.steps, "lr": h.lr, "batch_size": h.batch_size,
                                             "grad_accum": 1, "warmup_steps": min(self.train.warmup_steps, h.steps // 10)})

    def student_shape(self, vocab_size: int) -> StudentConfig:
        """The superposition student's full shape: ``student`` with the teacher's vocabulary and ``data.seq_len``."""
        return dataclasses.replace(self.student, vocab_size=vocab_size, max_seq_len=self.data.seq_len)

    def resolved_root(self) -> str:
        """The artifact root; a relative local path is taken relative to the repository."""
        root = self.storage.root
        if "://" in root:
            return root
        path = Path(root).expanduser()  # "~/x": neither the shell (after "=") nor YAML expands it
        return str(path if path.is_absolute() else REPO_ROOT / path)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and what to do."""


def preset_path(config: str | Path) -> Path:
    """A preset name (``quickstart``) or a YAML path (absolute, or relative to the repository)."""
    path = Path(config)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, REPO_ROOT / path, PRESETS_DIR / f"{config}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    raise ConfigError(f"no configuration {str(config)!r}: give a preset name ({', '.join(names)}) or a YAML file path")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["train.steps=20", ...]`` (the command line's ``--set``) as ``{"train.steps": "20"}``; values stay YAML text."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.steps=20")
        overrides[key.strip()] = value
    return overrides


def apply_overrides(raw: dict, overrides: dict[str, Any] | None) -> dict:
    """Set dotted keys (``{"train.steps": 20}``) in a nested mapping; values may be YAML strings (``"20"``)."""
    raw = copy.deepcopy(raw)
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        try:
            parsed = yaml.safe_load(value) if isinstance(value, str) else value
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {dotted}={value!r} is not valid YAML ({_yaml_problem(exc)}); quote a "
                              "string that starts with [, {, : or *, e.g. --set 'key=\"[x\"'") from None
        if isinstance(parsed, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = _merged(node[leaf], parsed)  # "train={steps: 5}" sets steps, keeps the preset's others
        else:
            node[leaf] = parsed
    return raw


def _merged(base: dict, update: dict) -> dict:
    return {**base, **{k: _merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in update.items()}}


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's own description of the problem, on one line, without its source excerpt."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem or exc}{where}"


def load_config(config: str | Path | dict | PipelineConfig = "quickstart",
                overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Resolve a preset name, YAML path or mapping plus overrides into a validated ``PipelineConfig``; a
    ``PipelineConfig`` without overrides is returned as it is (validated once, when it was made)."""
    if isinstance(config, PipelineConfig):
        if not overrides:
            return config
        raw = config.model_dump(mode="json")
    elif isinstance(config, dict):
        raw = config
    else:
        path = preset_path(config)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        return PipelineConfig.model_validate(apply_overrides(raw, overrides))
    except ValidationError as exc:
        problems = "; ".join(_problem(err) for err in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None


def _problem(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "string_type" and isinstance(err.get("input"), (int, float, bool, datetime.date)):
        return (f"{where}: {err['msg']}, got {err['input']!r} (YAML reads an unquoted 2024, 1.0, on or 2024-06-01 "
                f"as a number, a boolean or a date); quote the value, e.g. --set '{where}=\"...\"'")
    return f"{where}: {err['msg']}"
