"""Loading the teacher (any ``AutoModelForCausalLM`` name or local path) and running it for its outputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .config import REPO_ROOT, ConfigError, TeacherConfig
from .optim import quiet_torchao_logs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

quiet_torchao_logs()  # transformers imports torchao, when installed, on every from_pretrained


def resolve_device(spec: str = "auto") -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec != "auto":
        return DTYPES[spec]
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


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
        return AutoConfig.from_pretrained(model_source(cfg.name_or_path), revision=cfg.revision,
                                          trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise _hub_error(cfg, "config", exc) from None


def check_4bit_loading(cfg: TeacherConfig) -> None:
    if cfg.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
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


@torch.no_grad()
def teacher_outputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: list[int],
                    topk: int = 0) -> dict[str, torch.Tensor]:
    """One batched forward pass: the chosen hidden states (``hidden/layer_<i>``) and optional top-k logits."""
    # use_cache=False: no KV cache to build and fill (nothing here generates); docs/RESULTS.md section 1 measures it
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    result = {f"hidden/layer_{i}": out.hidden_states[i] for i in layers}
    if topk:
        values, indices = out.logits.topk(topk, dim=-1)
        result["topk_values"], result["topk_indices"] = values.half(), indices.int()
    return result
