"""Loading the teacher (any ``AutoModelForCausalLM`` name or local path) and running it for its outputs."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

from .config import REPO_ROOT, ConfigError, TeacherConfig
from .optim import quiet_torchao_logs
from .progress import logger

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

quiet_torchao_logs()  # transformers imports torchao, when installed, on every from_pretrained


def resolve_device(spec: str = "auto") -> torch.device:
    """``teacher.device`` as a torch device: ``auto`` picks CUDA, then MPS, then the CPU; a named device must exist."""
    if spec != "auto":
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise ConfigError(f"teacher.device {spec!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
        if device.type not in ("cpu", "cuda", "mps"):  # xpu, meta, ...: torch knows them; this pipeline does not
            raise ConfigError(f"teacher.device {spec!r}: the pipeline runs on cpu, cuda (cuda:N) or mps")
        _check_present(device, spec)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_present(device: torch.device, spec: str) -> None:
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"teacher.device {spec!r}: torch sees no CUDA device here (torch {torch.__version__}); "
                              "use teacher.device: auto or cpu, or install a CUDA build of torch")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"teacher.device {spec!r}: this machine has {count} CUDA device(s), cuda:0 to "
                              f"cuda:{count - 1}")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"teacher.device {spec!r}: MPS is not available here; use teacher.device: auto or cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 in hardware: a CUDA GPU of compute capability 8.0 on (Ampere, Hopper, ...)
    or ROCm. torch's ``is_bf16_supported()`` also says yes for a V100 or T4, which only emulate bf16, far slower."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``teacher.dtype``; ``auto`` is bf16 where the GPU computes it natively, else fp32 (``float16`` is the fast
    choice on an older GPU: training then scales the loss)."""
    if spec != "auto":
        return DTYPES[spec]
    return torch.bfloat16 if native_bf16(device) else torch.float32


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


def _hub_error(cfg: TeacherConfig, what: str, exc: Exception) -> ConfigError:
    return ConfigError(f"cannot load the teacher {what} {cfg.name_or_path!r} (revision {cfg.revision!r}): {exc}. "
                       "A Hub name needs network access or the local Hugging Face cache; offline, give a local path")


def load_tokenizer(cfg: TeacherConfig):
    from transformers import AutoTokenizer

    source = model_source(cfg.name_or_path)
    try:
        return AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise _hub_error(cfg, "tokenizer", exc) from None


def load_teacher_config(cfg: TeacherConfig):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_source(cfg.name_or_path), revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise _hub_error(cfg, "config", exc) from None
    except ValueError as exc:  # a config.json without a model_type transformers knows
        raise ConfigError(f"teacher.name_or_path {cfg.name_or_path!r} is not a Hugging Face model transformers "
                          f"can load: {str(exc).splitlines()[0]}; point it at a causal LM's directory or Hub "
                          "name") from None
    check_causal_lm(cfg, config)
    return config


def check_causal_lm(cfg: TeacherConfig, config) -> None:
    """The teacher must load as ``AutoModelForCausalLM`` (a T5 or BERT config would fail only at the cache stage)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if cfg.trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"teacher.name_or_path {cfg.name_or_path!r} is a {config.model_type} model, which "
                          "transformers does not load as a causal LM (AutoModelForCausalLM): distil a decoder-only "
                          "language model (Llama, Qwen2, Mistral, Phi3, GPT-NeoX, ...)")


def check_4bit_loading(cfg: TeacherConfig) -> None:
    if not cfg.load_in_4bit:
        return
    device = resolve_device(cfg.device)
    if device.type != "cuda":  # bitsandbytes' 4-bit layers run on CUDA; load_teacher maps the model onto one
        raise ConfigError(f"teacher.load_in_4bit loads the teacher onto a CUDA device, but teacher.device is "
                          f"{cfg.device!r} ({device.type} here): run on a GPU machine or set teacher.load_in_4bit: "
                          "false")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("teacher.load_in_4bit needs bitsandbytes: pip install 'bitnet-distill[quant4bit]' "
                          "(CUDA only), or set teacher.load_in_4bit: false")


def load_teacher(cfg: TeacherConfig, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """The teacher in eval mode on ``device`` (auto-detected by default), weights frozen."""
    from transformers import AutoModelForCausalLM

    device = device or resolve_device(cfg.device)
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    kwargs = dict(revision=cfg.revision, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.load_in_4bit:
        check_4bit_loading(cfg)
        from transformers import BitsAndBytesConfig

        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype),
                      device_map={"": device.index or 0})
    try:
        model = AutoModelForCausalLM.from_pretrained(model_source(cfg.name_or_path), **kwargs)
    except OSError as exc:
        raise _hub_error(cfg, "model", exc) from None
    if not cfg.load_in_4bit:
        model.to(device)
    return model.eval().requires_grad_(False)


def resolve_layers(layers: list[int], num_hidden_layers: int) -> list[int]:
    """Hidden-state indices as non-negative ints; 0 is the embeddings, ``num_hidden_layers`` the last block."""
    count = num_hidden_layers + 1
    if not layers:
        raise ConfigError(f"cache.layers is empty: list at least one hidden state, e.g. [-1] (the last of "
                          f"0..{num_hidden_layers})")
    bad = [i for i in layers if not -count <= i < count]
    if bad:
        raise ConfigError(f"cache.layers {bad} do not exist: the teacher has hidden states 0..{num_hidden_layers} "
                          f"(or -1..-{count})")
    return sorted({i % count for i in layers})


def hidden_layers(spec: list[int] | str, num_hidden_layers: int) -> list[int]:
    """Hidden-state indices to match; ``"all"`` is every block's output (the embeddings are shared anyway)."""
    if spec == "all":
        return list(range(1, num_hidden_layers + 1))
    return resolve_layers(spec, num_hidden_layers)


# Logits per block of the top-k. On a CPU, 2^21 (8 MB of float32: 512 rows at a 4096-token vocabulary) stay in its
# caches until topk reads them; a GPU wants fewer, larger kernels. But every block streams the whole output
# embedding again, so one too large for the caches gets at least 1024 rows per block: on a CPU a 151,936 x 1536 head
# ran at 0.94x the speed of the whole logits' top-k with 1024 rows and 0.27x with 16 (bench/topk_blocks.py).
TOPK_BLOCK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 27}
LARGE_HEAD_BYTES, LARGE_HEAD_MIN_ROWS = 32 << 20, 1024


def topk_block_rows(head: torch.Tensor) -> int:
    """Rows of logits per block of the top-k, for the output embedding's weight ``head`` [vocab, hidden]."""
    budget = TOPK_BLOCK_ELEMENTS.get(head.device.type, TOPK_BLOCK_ELEMENTS["cuda"])
    least = LARGE_HEAD_MIN_ROWS if head.numel() * head.element_size() > LARGE_HEAD_BYTES else 1
    return max(least, budget // head.shape[0])


class TeacherForward:
    """The cache stage's forward pass of the teacher: the chosen hidden states (``hidden/layer_<i>``) and, with
    ``topk``, the top-k logits (``topk_values`` float16, ``topk_indices`` int32) of every position.

    The output embedding and the top-k run fused, block by block of rows of the last hidden state, so the
    [batch, seq, vocab] logits never exist: the same values at about half the top-k's cost on the quickstart teacher
    (docs/RESULTS.md section 1), and gigabytes less memory with a 150k vocabulary. Without ``topk`` the output
    embedding is skipped altogether. That is only right where the model's logits are its output embedding of its
    last hidden state, so the first row of the first batch runs both ways and compares (``fused`` says how it went):
    a model that post-processes its logits (Gemma's soft-capping, Cohere's logit scale) keeps computing its full
    logits.
    """

    def __init__(self, model, layers: list[int], topk: int = 0, log: Callable[[str], None] = logger.info):
        self.model, self.layers, self.topk, self.log = model, layers, topk, log
        self.fused: bool | None = None  # decided by the first call
        self.block_rows = topk_block_rows(model.get_output_embeddings().weight)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                      use_cache=False)  # no KV cache to build and fill (nothing here generates): RESULTS section 1
        if self.fused is None:  # probed on the first row: the whole logits of one row cost little memory
            self.fused = self._fused_matches(dict(kwargs, input_ids=input_ids[:1], attention_mask=attention_mask[:1]))
        return self._stored(*(self._fused(kwargs) if self.fused else self._full_logits(kwargs)))

    def _hidden(self, out) -> dict[str, torch.Tensor]:
        return {f"hidden/layer_{i}": out.hidden_states[i] for i in self.layers}

    def _full_logits(self, kwargs: dict):
        """The model's own forward: what the fused path must reproduce."""
        out = self.model(**kwargs)
        hidden = self._hidden(out)
        return (hidden, out.logits.topk(self.topk, dim=-1)) if self.topk else (hidden, None)

    def _fused(self, kwargs: dict):
        out = self.model.base_model(**kwargs)
        hidden = self._hidden(out)
        if not self.topk:
            return hidden, None
        last = out.last_hidden_state
        head = self.model.get_output_embeddings()
        blocks = [head(rows).topk(self.topk, dim=-1) for rows in last.flatten(0, 1).split(self.block_rows)]
        shape = (*last.shape[:2], self.topk)
        return hidden, (torch.cat([v for v, _ in blocks]).view(shape), torch.cat([i for _, i in blocks]).view(shape))

    def _stored(self, hidden: dict, topk) -> dict[str, torch.Tensor]:
        if topk is None:
            return hidden
        return {**hidden, "topk_values": topk[0].half(), "topk_indices": topk[1].int()}

    def _fused_matches(self, kwargs: dict) -> bool:
        own = self._full_logits(kwargs)
        try:
            fused = self._fused(kwargs)
        except Exception as exc:  # e.g. a base model without last_hidden_state: the model's own forward stays
            self.log(f"teacher cache: the top-k comes from the full logits (the block-wise path failed: "
                     f"{type(exc).__name__}: {exc})")
            return False
        # Compared in the computing dtype, before rounding to float16; the top-k values (sorted) do not depend on
        # how ties are ordered, the indices would.
        pairs = {**{name: (fused[0][name], value) for name, value in own[0].items()},
                 **({"top-k logits": (fused[1][0], own[1][0])} if self.topk else {})}
        mismatched = [name for name, (a, b) in pairs.items() if not _close(a, b)]
        if mismatched:
            self.log("teacher cache: the teacher's logits are not its output embedding of its last hidden state "
                     f"({', '.join(mismatched)} differ: logit soft-capping or scaling?), so the top-k comes from its "
                     "full logits")
        return not mismatched


def _close(fused: torch.Tensor, own: torch.Tensor) -> bool:
    """Equal up to a few roundings of the computing dtype (kernels may block a matmul differently by shape)."""
    if fused.shape != own.shape:
        return False
    fused, own, eps = fused.float(), own.float(), torch.finfo(own.dtype).eps
    return bool(((fused - own).abs() <= 4 * eps * own.abs().amax()).all())
