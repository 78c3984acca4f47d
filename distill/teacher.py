"""The teacher: where it is, what it is (its identity, which the fingerprints hash), and its parts, each loaded at
most once per stage process (a ``Teacher`` is made per stage and caches its config and tokenizer; weights are loaded
by the one stage call that needs them).

A teacher is any ``AutoModelForCausalLM`` name or local path. Its identity distinguishes its weights without
loading them: for a Hub name, the commit (the revision itself when it is a commit hash, else what the local Hugging
Face cache says it resolved to); for a local directory, a hash of its files' names and contents, not of its location
or its directory's name, so a copy elsewhere under any name is the same teacher.
"""

from __future__ import annotations

import importlib.util
import re
from functools import cached_property
from pathlib import Path

import torch
from pydantic import BaseModel

from storage.fingerprint import directory_identity, is_commit

from .config import REPO_ROOT, ConfigError, TeacherConfig
from .device import resolve_device, resolve_dtype
from .optim import quiet_torchao_logs

quiet_torchao_logs()  # transformers imports torchao, when installed, on every from_pretrained

# The files of a local model directory that make its tokenizer: retrained weights keep the token shards.
_TOKENIZER_FILES = re.compile(r"(^|/)(tokenizer[^/]*|special_tokens_map\.json|added_tokens\.json|vocab\.[^/]+"
                              r"|merges\.txt|[^/]*\.model|[^/]*\.tiktoken|chat_template[^/]*)$")


def model_source(name_or_path: str) -> str:
    """A local directory (absolute, or relative to the cwd or the repository) or a Hub name, as given."""
    for candidate in (Path(name_or_path).expanduser(), REPO_ROOT / name_or_path):
        if candidate.is_dir():
            return str(candidate.resolve())
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise ConfigError(f"teacher.name_or_path: {name_or_path} does not exist (a local path; or give a Hub name "
                          "such as Qwen/Qwen2.5-Coder-1.5B-Instruct)")
    return name_or_path


def hub_commit(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> str | None:
    """The commit ``revision`` (default ``main``) resolved to in the local Hugging Face cache, or None."""
    if is_commit(revision):
        return revision
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    if not isinstance(cached, str):
        return None
    parts = Path(cached).parts  # .../models--org--name/snapshots/<commit>/config.json
    return parts[-2] if len(parts) >= 3 and parts[-3] == "snapshots" else None


def identity(source: str, revision: str | None = None, tokenizer_only: bool = False) -> dict:
    """``{sha256, files}`` of a local model directory (every file but documentation and hidden ones; with
    ``tokenizer_only``, its tokenizer's files), or ``{name, revision, commit}`` for a Hub name (``commit`` None when
    the revision is not a commit hash and the model is not in the local cache: pin ``teacher.revision`` to a commit
    for strict reproducibility)."""
    path = Path(source)
    if path.is_dir():
        found = directory_identity(path, _TOKENIZER_FILES if tokenizer_only else None)
        if not found["files"]:
            raise ConfigError(f"teacher.name_or_path: {path} has no {'tokenizer' if tokenizer_only else 'model'} files")
        return found
    return {"name": source, "revision": revision or "main", "commit": hub_commit(source, revision)}


class TeacherFacts(BaseModel):
    """What the plan knows of the teacher, read from its config and tokenizer (no weights)."""

    identity: dict
    tokenizer_identity: dict  # the tokenizer files only: retrained weights keep the token shards
    compute_dtype: str
    num_hidden_layers: int
    hidden_size: int
    vocab_size: int
    max_positions: int | None


class Teacher:
    """One teacher configuration (``teacher.*``), its parts loaded on first use and kept."""

    def __init__(self, cfg: TeacherConfig):
        self.cfg = cfg

    @cached_property
    def source(self) -> str:
        return model_source(self.cfg.name_or_path)

    def _hub_error(self, what: str, exc: Exception) -> ConfigError:
        return ConfigError(f"cannot load the teacher {what} {self.cfg.name_or_path!r} (revision {self.cfg.revision!r}): "
                           f"{exc}. A Hub name needs network access or the local Hugging Face cache; offline, give a "
                           "local path")

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.source, revision=self.cfg.revision,
                                                 trust_remote_code=self.cfg.trust_remote_code)
        except OSError as exc:
            raise self._hub_error("tokenizer", exc) from None

    @cached_property
    def config(self):
        """The teacher's transformers config; a model transformers cannot load as a causal LM is a ``ConfigError``."""
        from transformers import AutoConfig

        source = self.source  # a ConfigError of its own if the path does not exist
        try:
            config = AutoConfig.from_pretrained(source, revision=self.cfg.revision,
                                                trust_remote_code=self.cfg.trust_remote_code)
        except OSError as exc:
            raise self._hub_error("config", exc) from None
        except ValueError as exc:  # a config.json without a model_type transformers knows
            raise ConfigError(f"teacher.name_or_path {self.cfg.name_or_path!r} is not a Hugging Face model "
                              f"transformers can load: {str(exc).splitlines()[0]}; point it at a causal LM's "
                              "directory or Hub name") from None
        self._check_causal_lm(config)
        return config

    @property
    def text_config(self):
        """The language model's own config (a multimodal model's text part)."""
        return self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config

    def _check_causal_lm(self, config) -> None:
        """The teacher must load as ``AutoModelForCausalLM`` (a T5 or BERT config would fail only at the cache stage)."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if self.cfg.trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
            return
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ConfigError(f"teacher.name_or_path {self.cfg.name_or_path!r} is a {config.model_type} model, which "
                              "transformers does not load as a causal LM (AutoModelForCausalLM): distil a decoder-only "
                              "language model (Llama, Qwen2, Mistral, Phi3, GPT-NeoX, ...)")

    def facts(self) -> TeacherFacts:
        """What the fingerprints and checks need, from the config and tokenizer alone."""
        text = self.text_config
        return TeacherFacts(
            identity=identity(self.source, self.cfg.revision),
            tokenizer_identity=identity(self.source, self.cfg.revision, tokenizer_only=True),
            compute_dtype=str(resolve_dtype(self.cfg.dtype, resolve_device(self.cfg.device))).removeprefix("torch."),
            num_hidden_layers=text.num_hidden_layers, hidden_size=text.hidden_size, vocab_size=text.vocab_size,
            max_positions=getattr(text, "max_position_embeddings", None))

    def check_4bit_loading(self) -> None:
        if not self.cfg.load_in_4bit:
            return
        device = resolve_device(self.cfg.device)
        if device.type != "cuda":  # bitsandbytes' 4-bit layers run on CUDA; load maps the model onto one
            raise ConfigError(f"teacher.load_in_4bit loads the teacher onto a CUDA device, but teacher.device is "
                              f"{self.cfg.device!r} ({device.type} here): run on a GPU machine or set "
                              "teacher.load_in_4bit: false")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("teacher.load_in_4bit needs bitsandbytes: pip install 'bitnet-distill[quant4bit]' "
                              "(CUDA only), or set teacher.load_in_4bit: false")

    def load(self, device: torch.device | None = None, *, in_4bit: bool | None = None):
        """The teacher's weights in eval mode on ``device`` (``teacher.device`` by default), in ``teacher.dtype``,
        frozen. ``in_4bit`` (default ``teacher.load_in_4bit``) quantizes them with bitsandbytes."""
        from transformers import AutoModelForCausalLM

        device = device or resolve_device(self.cfg.device)
        dtype = resolve_dtype(self.cfg.dtype, device)
        in_4bit = self.cfg.load_in_4bit if in_4bit is None else in_4bit
        kwargs = dict(revision=self.cfg.revision, dtype=dtype, trust_remote_code=self.cfg.trust_remote_code)
        if in_4bit:
            self.check_4bit_loading()
            from transformers import BitsAndBytesConfig

            kwargs.update(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype),
                          device_map={"": device.index or 0})
        try:
            model = AutoModelForCausalLM.from_pretrained(self.source, **kwargs)
        except OSError as exc:
            raise self._hub_error("model", exc) from None
        if not in_4bit:
            model.to(device)
        return model.eval().requires_grad_(False)


def resolve_layers(layers: list[int], num_hidden_layers: int, field: str = "cache.layers") -> list[int]:
    """Hidden-state indices as non-negative ints; 0 is the embeddings, ``num_hidden_layers`` the last block."""
    count = num_hidden_layers + 1
    if not layers:
        raise ConfigError(f"{field} is empty: list at least one hidden state, e.g. [-1] (the last of "
                          f"0..{num_hidden_layers})")
    bad = [i for i in layers if not -count <= i < count]
    if bad:
        raise ConfigError(f"{field} {bad} do not exist: the teacher has hidden states 0..{num_hidden_layers} "
                          f"(or -1..-{count})")
    return sorted({i % count for i in layers})


def hidden_layers(spec: list[int] | str, num_hidden_layers: int) -> list[int]:
    """``self_distill.hidden_layers`` as hidden-state indices; ``"all"`` is every block's output (the embeddings are
    shared anyway)."""
    if spec == "all":
        return list(range(1, num_hidden_layers + 1))
    return resolve_layers(spec, num_hidden_layers, "self_distill.hidden_layers")
