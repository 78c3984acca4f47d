"""GGUF export of a ternary student, for llama.cpp's TQ2_0 / TQ1_0 kernels.

``save_gguf(model, path, tokenizer, qtype)`` writes a self-distilled ``DualModel`` (Llama, Mistral or Qwen2) or a
``SuperpositionStudent`` (written as a llama-architecture model) with the ``gguf`` package's writer:

* Each ternary layer's codes are written exactly, and its one per-tensor scale ``mean|W|`` becomes the scale of
  every 256-value block. TQ1_0 and TQ2_0 store that scale in fp16, so the values llama.cpp multiplies with are
  ``codes x fp16(scale)``: the fp32 scale rounded to 11 significant bits (a relative change below 2**-11, the same
  for every weight of the layer, so it scales the layer's output by a constant within 0.05%). Scales below fp16's
  smallest normal number (6.1e-5) lose more bits; scales above 65504 cannot be written and raise an error.
* A layer whose rows (``in_features``) are not a multiple of 256 cannot be held by the TQ types. It falls back to
  Q8_0 (32-value blocks: int8 codes in {-1, 0, 1}, the same fp16 scale in every block) where its rows are a multiple
  of 32, else to F16 (``codes x fp16(scale)``, exact for the same reason). Either holds exactly the same values as
  the TQ types would; the summary returned names those layers and their type.
* Embeddings and the output head are F16 (``embeddings="q8_0"``: Q8_0, about half the bytes); norms and biases F32.
* Metadata follows llama.cpp's own converter (``convert_hf_to_gguf.py``) for these architectures; it is a reference,
  not a dependency. Llama's q/k rows are permuted into the interleaved RoPE layout llama.cpp's ``llama``
  architecture uses (a row permutation keeps the ternary codes and the per-tensor scale valid); Qwen2 uses
  rotate-half RoPE in llama.cpp as in transformers and is written as it is.
* The byte-level BPE tokenizer (vocabulary, merges, token types, special tokens, whether BOS/EOS are added) goes
  into the metadata, with a pre-tokenizer llama.cpp knows, chosen from the tokenizer's own pre-tokenizer
  (``pre_tokenizer`` overrides it). llama.cpp refuses a BPE vocabulary whose pre-tokenizer it does not recognise.

``save_teacher_gguf`` writes the teacher of a self-distilled model (its weights W in F16 or Q8_0) the same way: the
baseline to time and compare a student's file with in llama.cpp.

``gguf`` is imported inside the functions: the rest of ``bitnet`` does without it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .layers import TernaryLinear
from .patch import DualModel
from .quant import ternary_weight
from .student import SuperpositionStudent

QTYPES = ("tq2_0", "tq1_0")
EMBEDDING_TYPES = ("f16", "q8_0")
TQ_BLOCK = 256  # values per TQ1_0 / TQ2_0 block (ggml's QK_K)
Q8_BLOCK = 32  # values per Q8_0 block
FP16_MAX = 65504.0
INSTALL_HINT = "pip install gguf (a dependency of bitnet-distill: pip install -e . installs it)"

# The families save_gguf writes, by transformers' model_type: llama.cpp's architecture and whether q/k rows need the
# converter's permutation (llama.cpp's llama architecture rotates interleaved pairs, transformers rotates halves).
# Mistral is a llama model to llama.cpp's converter too; its sliding window is not written (llama.cpp's llama
# architecture has none), so contexts beyond that window attend further than in transformers.
HF_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}

# Pre-tokenizers llama.cpp implements, recognised by the regex of the tokenizer's Split (transformers' tokenizer.json);
# each is the "original regex from tokenizer.json" llama.cpp's llama-vocab.cpp names for that pre-tokenizer type.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE_TOKENIZERS = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError(f"GGUF export needs the gguf package: {INSTALL_HINT}") from None
    return gguf


# ---- tensors ---------------------------------------------------------------------------------------------------------

def fp16_scale(scale: torch.Tensor | float) -> np.float16:
    """The per-tensor scale as the fp16 every block stores (see the module docstring for what the rounding does)."""
    value = float(scale)
    if not np.isfinite(value) or abs(value) > FP16_MAX:
        raise ValueError(f"a ternary scale of {value} cannot be stored in fp16 (at most {FP16_MAX}): the layer's "
                         "weights are not finite or far out of range")
    return np.float16(value)


def rope_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q or k rows from transformers' rotate-half RoPE layout to llama.cpp's interleaved one, per head
    (what llama.cpp's converter does to Llama's q_proj / k_proj): row ``h*d + 2j + p`` takes row ``h*d + p*d/2 + j``."""
    return (rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def ternary_type_for(in_features: int, qtype: str) -> str:
    """The GGML type a ternary layer with rows of ``in_features`` values is written in: ``qtype`` where its rows are
    whole 256-value blocks, else Q8_0 where they are whole 32-value blocks, else F16."""
    if in_features % TQ_BLOCK == 0:
        return qtype.upper()
    return "Q8_0" if in_features % Q8_BLOCK == 0 else "F16"


def ternary_data(codes: torch.Tensor, scale: torch.Tensor | float, type_name: str) -> np.ndarray:
    """The bytes (TQ1_0, TQ2_0, Q8_0) or values (F16) of a ternary tensor ``codes x fp16(scale)``, rows as they are."""
    gguf = _gguf()
    codes_np = codes.detach().to(torch.int8).cpu().numpy()
    d = fp16_scale(scale)
    if type_name == "F16":
        return codes_np.astype(np.float16) * d  # exact: each value is 0 or +-fp16(scale)
    rows, cols = codes_np.shape
    qtype = gguf.GGMLQuantizationType[type_name]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if type_name == "Q8_0":  # block_q8_0: fp16 scale, then 32 int8 values; the codes are the int8 values
        blocks = np.empty((rows, cols // block, type_size), dtype=np.uint8)
        blocks[..., :2] = np.frombuffer(d.tobytes(), dtype=np.uint8)
        blocks[..., 2:] = codes_np.reshape(rows, cols // block, block).view(np.uint8)
        return blocks.reshape(rows, -1)
    # gguf's quantizer packs the codes (each block's absmax becomes its scale: 1, or 0 for an all-zero block); the
    # fp16 scale is the last field of block_tq1_0 and block_tq2_0, and is then set to the layer's own in every block
    blocks = gguf.quants.quantize(codes_np.astype(np.float32), qtype).reshape(rows, cols // block, type_size)
    blocks[..., -2:] = np.frombuffer(d.tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, -1)


@dataclass
class Entry:
    """One GGUF tensor: its name, where it came from, and either full-precision values or ternary codes + scale."""

    name: str
    source: str
    values: torch.Tensor | None = None  # 1-D: written F32; 2-D (embeddings, head): F16 or Q8_0
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    linear: bool = False  # values of a block linear layer (a teacher's): written in the file's own type


@dataclass
class Spec:
    """What ``save_gguf`` writes: the architecture, its hyperparameters and its tensors."""

    arch: str
    hparams: dict
    entries: list[Entry] = field(default_factory=list)
    vocab_size: int = 0


def _tensor_name(kind: str, block: int | None = None, suffix: str = "weight") -> str:
    gguf = _gguf()
    base = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)]
    return (base.format(bid=block) if block is not None else base) + f".{suffix}"


def _ternary(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes and scale a student layer computes with."""
    if isinstance(layer, TernaryLinear):
        return layer.weight_codes, layer.weight_scale
    with torch.no_grad():
        weight = layer.student_weight() if hasattr(layer, "student_weight") else layer.weight
        return ternary_weight(weight)


def _ties_head(model: nn.Module) -> bool:
    """Whether the output head is the input embedding matrix (then llama.cpp reads token_embd for both)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight.data_ptr() == embed.weight.data_ptr()


# ---- what each kind of model writes ----------------------------------------------------------------------------------

def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type") or (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"save_gguf writes plain RoPE only; this model's rope_type is {rope_type!r} (llama.cpp's "
                         "convert_hf_to_gguf.py shows the extra metadata and tensors it would need)")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _architecture(config) -> tuple[str, bool]:
    """llama.cpp's architecture for a transformers (text) config, and whether q/k rows need permuting."""
    if config.model_type not in HF_ARCHITECTURES:
        raise ValueError(f"save_gguf writes {', '.join(HF_ARCHITECTURES)} models; this one is "
                         f"{config.model_type!r}. Export it in transformers' bitnet format (save_ternary_pretrained)")
    return HF_ARCHITECTURES[config.model_type]


def _hf_spec(dual: DualModel, teacher: bool = False) -> Spec:
    """A patched transformers Llama / Mistral / Qwen2: its own tensors, the patched layers ternary (``teacher``: the
    patched layers' original weights W)."""
    gguf = _gguf()
    model = dual.model
    config = _text_config(model.config)
    arch, permute = _architecture(config)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    spec = Spec(arch, {
        "context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size, "block_count": config.num_hidden_layers,
        "head_count": n_head, "head_count_kv": n_kv, "rope_freq_base": _rope_theta(config),
        "layer_norm_rms_eps": config.rms_norm_eps, "head_dim": head_dim,
    }, vocab_size=config.vocab_size)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config.num_hidden_layers)
    tied = _ties_head(model)
    head_name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    patched = {f"{name}.weight": name for name in dual.layers}
    for key, tensor in model.state_dict().items():
        if ".delta." in key or (tied and key == f"{head_name}.weight"):
            continue
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"save_gguf does not know where {key!r} goes in a llama.cpp {arch} model")
        heads = n_head if ".attn_q." in gguf_name else n_kv if ".attn_k." in gguf_name else None
        if key in patched and not teacher:
            codes, scale = _ternary(dual.layers[patched[key]])
            codes = rope_permute(codes, heads) if permute and heads else codes
            spec.entries.append(Entry(gguf_name, patched[key], codes=codes, scale=scale))
        else:
            values = tensor.detach().float().cpu()
            values = rope_permute(values, heads) if permute and heads else values
            spec.entries.append(Entry(gguf_name, key.removesuffix(".weight"), values=values, linear=key in patched))
    return spec


def _student_spec(student: SuperpositionStudent) -> Spec:
    """The superposition student (pre-norm RMSNorm blocks, rotate-half RoPE, fused qkv, SwiGLU) as a llama model."""
    cfg = student.config
    spec = Spec("llama", {
        "context_length": cfg.max_seq_len, "embedding_length": cfg.dim, "feed_forward_length": cfg.mlp_hidden,
        "block_count": cfg.n_layers, "head_count": cfg.n_heads, "head_count_kv": cfg.n_heads,
        "rope_freq_base": cfg.rope_theta, "layer_norm_rms_eps": cfg.norm_eps, "head_dim": cfg.dim // cfg.n_heads,
    }, vocab_size=cfg.vocab_size)
    add = spec.entries.append
    add(Entry(_tensor_name("TOKEN_EMBD"), "embed", values=student.embed.weight.detach().float().cpu()))
    for i, block in enumerate(student.blocks):
        prefix = f"blocks.{i}"
        add(Entry(_tensor_name("ATTN_NORM", i), f"{prefix}.attn_norm", values=block.attn_norm.weight.detach().float()))
        codes, scale = _ternary(block.attn.qkv)
        q, k, v = codes.chunk(3, dim=0)  # rows: q heads, k heads, v heads (the view in Attention.forward)
        for kind, rows in (("ATTN_Q", rope_permute(q, cfg.n_heads)), ("ATTN_K", rope_permute(k, cfg.n_heads)),
                           ("ATTN_V", v)):
            add(Entry(_tensor_name(kind, i), f"{prefix}.attn.qkv[{kind[-1].lower()}]", codes=rows, scale=scale))
        for kind, layer, source in (("ATTN_OUT", block.attn.out, "attn.out"), ("FFN_GATE", block.mlp.gate, "mlp.gate"),
                                    ("FFN_UP", block.mlp.up, "mlp.up"), ("FFN_DOWN", block.mlp.down, "mlp.down")):
            codes, scale = _ternary(layer)
            add(Entry(_tensor_name(kind, i), f"{prefix}.{source}", codes=codes, scale=scale))
        add(Entry(_tensor_name("FFN_NORM", i), f"{prefix}.mlp_norm", values=block.mlp_norm.weight.detach().float()))
    add(Entry(_tensor_name("OUTPUT_NORM"), "norm", values=student.norm.weight.detach().float()))
    if student.lm_head.weight is not student.embed.weight:
        add(Entry(_tensor_name("OUTPUT"), "lm_head", values=student.lm_head.weight.detach().float().cpu()))
    return spec


def gguf_spec(model: DualModel | SuperpositionStudent) -> Spec:
    if isinstance(model, DualModel):
        return _hf_spec(model)
    if isinstance(model, SuperpositionStudent):
        return _student_spec(model)
    raise TypeError(f"save_gguf takes a bitnet.DualModel or a bitnet.SuperpositionStudent, not {type(model).__name__}")


# ---- tokenizer -------------------------------------------------------------------------------------------------------

def detect_pre_tokenizer(tokenizer_json: dict) -> str:
    """The llama.cpp pre-tokenizer that splits text as this byte-level BPE tokenizer does, from its tokenizer.json."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[0].get("behavior") == "Isolated"
            and not parts[0].get("invert") and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True) and not parts[1].get("add_prefix_space", False)):
        name = SPLIT_PRE_TOKENIZERS.get((parts[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise ValueError(f"llama.cpp has no pre-tokenizer known to match this tokenizer's ({json.dumps(pre)[:300]}); "
                     "if you know the llama.cpp name that splits text the same way (llama-vocab.cpp), pass it as "
                     "pre_tokenizer=..., and check that llama.cpp tokenizes held-out text as transformers does")


def _byte_level_bpe(tokenizer, pre_tokenizer: str | None = None) -> tuple[dict, str]:
    """The tokenizer's BPE model (from its tokenizer.json) and llama.cpp's name for its pre-tokenizer; a clear error
    for a tokenizer save_gguf cannot write."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("save_gguf needs a fast (tokenizers-backed) tokenizer: load it with AutoTokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = model.get("type", "?")
        kind += " with byte fallback (SentencePiece style)" if model.get("byte_fallback") else ""
        raise ValueError(f"save_gguf writes byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2 style); this one is "
                         f"{kind}. llama.cpp's own convert_hf_to_gguf.py handles the others")
    return model, pre_tokenizer or detect_pre_tokenizer(spec)


def check_exportable(tokenizer, config=None) -> None:
    """Raise ``ValueError`` naming the problem where ``save_gguf`` could not write this tokenizer or (given a
    transformers config: a self-distilled model of it) this architecture. Needs no weights: a pipeline checks this
    before any work."""
    _gguf()
    if config is not None:
        text = _text_config(config)
        _architecture(text)
        _rope_theta(text)
    _byte_level_bpe(tokenizer)


def tokenizer_metadata(tokenizer, vocab_size: int, pre_tokenizer: str | None = None) -> dict:
    """The GGUF tokenizer keys of a byte-level BPE (``gpt2``-model) tokenizer: token list of ``vocab_size`` (the
    embedding's rows; ids no token has are unused padding, as the converter writes them), types, merges, special
    ids, and whether transformers adds BOS / EOS when encoding (llama.cpp follows these keys)."""
    gguf = _gguf()
    model, pre = _byte_level_bpe(tokenizer, pre_tokenizer)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} "
                         "embeddings")
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added
                         else gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    special = {kind: getattr(tokenizer, f"{kind}_token_id", None) for kind in ("bos", "eos", "unk", "pad")}
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges,
            "special": {k: v for k, v in special.items() if v is not None},
            "add_bos": special["bos"] is not None and probe[:1] == [special["bos"]],
            "add_eos": special["eos"] is not None and probe[-1:] == [special["eos"]]}


# ---- writing ---------------------------------------------------------------------------------------------------------

def _full_precision(values: torch.Tensor, type_name: str) -> np.ndarray:
    gguf = _gguf()
    array = values.numpy()
    if type_name == "F32":
        return array.astype(np.float32)
    if type_name == "F16":
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType[type_name])


def save_gguf(model: DualModel | SuperpositionStudent, path: str | Path, tokenizer, qtype: str = "tq2_0",
              embeddings: str = "f16", name: str | None = None, pre_tokenizer: str | None = None) -> dict:
    """Write the ternary student ``model`` as one GGUF file for llama.cpp (see the module docstring).

    ``qtype``: ``tq2_0`` (2.06 bits per weight) or ``tq1_0`` (1.69); ``embeddings``: ``f16`` or ``q8_0`` for the
    token embeddings and the output head. Returns ``path``, ``bytes``, ``qtype``, ``embeddings`` (the type written),
    ``ternary_layers`` (their count), ``fallback`` (each ternary layer written in another type than ``qtype``, by its
    name in the model, with that type), ``architecture`` and ``pre_tokenizer``.
    """
    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
    return _write(gguf_spec(model), path, tokenizer, qtype, embeddings, name or "bitnet-distill student",
                  pre_tokenizer)


def save_teacher_gguf(dual: DualModel, path: str | Path, tokenizer, wtype: str = "f16", embeddings: str = "f16",
                      name: str | None = None, pre_tokenizer: str | None = None) -> dict:
    """Write the teacher of a self-distilled model (its original weights W) with every block linear layer in F16 or
    Q8_0 (``wtype``): the baseline a student's GGUF is compared with in llama.cpp (``bench/gguf_speed.py``).
    Returns what ``save_gguf`` returns, ``qtype`` being ``wtype``."""
    if wtype not in EMBEDDING_TYPES:
        raise ValueError(f"wtype must be one of {EMBEDDING_TYPES}, got {wtype!r}")
    return _write(_hf_spec(dual, teacher=True), path, tokenizer, wtype, embeddings, name or "teacher", pre_tokenizer)


def _q8_or_f16(row_length: int, wanted: str) -> str:
    """``wanted`` (F16 or Q8_0) where rows of ``row_length`` values can hold it; Q8_0 needs whole 32-value blocks."""
    return wanted.upper() if row_length % Q8_BLOCK == 0 else "F16"


def _write(spec: Spec, path: str | Path, tokenizer, qtype: str, embeddings: str, name: str,
           pre_tokenizer: str | None) -> dict:
    gguf = _gguf()
    if embeddings not in EMBEDDING_TYPES:
        raise ValueError(f"embeddings must be one of {EMBEDDING_TYPES}, got {embeddings!r}")
    vocab = tokenizer_metadata(tokenizer, spec.vocab_size, pre_tokenizer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), spec.arch)
    _write_metadata(writer, spec, vocab, qtype, name)

    fallback: dict[str, str] = {}
    ternary = 0
    embed_type = _q8_or_f16(spec.hparams["embedding_length"], embeddings)
    for entry in spec.entries:
        if entry.codes is not None:
            type_name = ternary_type_for(entry.codes.shape[1], qtype)
            if type_name != qtype.upper():
                fallback[entry.source] = type_name
            data = ternary_data(entry.codes, entry.scale, type_name)
            ternary += 1
        else:
            if entry.values.dim() == 1:
                type_name = "F32"
            elif entry.linear:  # a teacher's block linear layer
                type_name = _q8_or_f16(entry.values.shape[1], qtype)
            else:
                type_name = embed_type
            data = _full_precision(entry.values, type_name)
        writer.add_tensor(entry.name, data, raw_dtype=gguf.GGMLQuantizationType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"path": str(path), "bytes": os.path.getsize(path), "qtype": qtype, "embeddings": embed_type.lower(),
            "ternary_layers": ternary, "fallback": fallback, "architecture": spec.arch, "pre_tokenizer": vocab["pre"]}


def _write_metadata(writer, spec: Spec, vocab: dict, qtype: str, name: str) -> None:
    """The keys llama.cpp's converter writes for a llama / qwen2 model, and the tokenizer's."""
    gguf = _gguf()
    h = spec.hparams
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(str(name))
    writer.add_block_count(h["block_count"])
    writer.add_context_length(h["context_length"])
    writer.add_embedding_length(h["embedding_length"])
    writer.add_feed_forward_length(h["feed_forward_length"])
    writer.add_head_count(h["head_count"])
    writer.add_head_count_kv(h["head_count_kv"])
    writer.add_rope_freq_base(h["rope_freq_base"])
    writer.add_layer_norm_rms_eps(h["layer_norm_rms_eps"])
    writer.add_key_length(h["head_dim"])
    writer.add_value_length(h["head_dim"])
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype.upper()}"))  # tq2_0, tq1_0, f16 or q8_0
    if spec.arch == "llama":  # the converter's LlamaModel adds these two
        writer.add_vocab_size(spec.vocab_size)
        writer.add_rope_dimension_count(h["head_dim"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])  # no scores: llama.cpp's BPE tokenizer merges by the merges' rank
    writer.add_token_merges(vocab["merges"])
    for kind, token_id in vocab["special"].items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
