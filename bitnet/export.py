"""Packed ternary export.

* ``pack_ternary`` / ``unpack_ternary``: four ternary values per byte in exactly the layout of transformers'
  ``integrations/bitnet.py`` (values ``w + 1`` in {0, 1, 2}, two bits each, packed along the output dimension
  in row blocks: byte row ``r`` holds original rows ``r, r+R, r+2R, r+3R`` in bit pairs 0-1 ... 6-7).
* ``save_ternary_pretrained``: a self-distilled model as a checkpoint that stock
  ``AutoModelForCausalLM.from_pretrained`` loads (``quant_method: bitnet``, ``linear_class: bitlinear``,
  offline quantization; transformers' BitLinear *divides* by ``weight_scale``, so it holds ``1 / mean(|W|)``).
* ``save_student`` / ``load_student``: the superposition student (+ decompressor) in our own format:
  packed codes and scales in safetensors, architecture in JSON.
* ``save_gguf`` (from ``bitnet.gguf``): either student as one GGUF file for llama.cpp (TQ2_0 / TQ1_0).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .gguf import save_gguf  # noqa: F401  (re-exported: every export of a student is here)
from .layers import BitLinear, TernaryLinear
from .patch import DualModel, find_block_linears
from .quant import ternary_weight
from .student import Decompressor, SuperpositionStudent

VALUES_PER_BYTE = 4
STUDENT_FORMAT = "bitnet-distill/superposition-student"
STUDENT_FORMAT_VERSION = 1


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes {-1, 0, 1} of shape ``[out, ...]`` into uint8 ``[ceil(out / 4), ...]``."""
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("pack_ternary expects values in {-1, 0, 1}; quantize with ternary_weight first")
    out = codes.shape[0]
    rows = -(-out // VALUES_PER_BYTE)
    padded = torch.zeros((VALUES_PER_BYTE * rows, *codes.shape[1:]), dtype=torch.uint8, device=codes.device)
    padded[:out] = (codes + 1).to(torch.uint8)  # padding rows stay 0, as transformers' pack_weights leaves them
    blocks = padded.view(VALUES_PER_BYTE, rows, *codes.shape[1:])
    packed = blocks[0].clone()
    for i in range(1, VALUES_PER_BYTE):
        packed |= blocks[i] << (2 * i)
    return packed


def unpack_ternary(packed: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
    """Inverse of ``pack_ternary``: int8 codes ``[out_features, ...]`` (default: all ``4 * rows`` rows)."""
    shifts = torch.arange(0, 2 * VALUES_PER_BYTE, 2, dtype=torch.uint8, device=packed.device)
    shifts = shifts.view(VALUES_PER_BYTE, *([1] * packed.dim()))
    codes = ((packed.unsqueeze(0) >> shifts) & 3).to(torch.int8) - 1
    codes = codes.reshape(VALUES_PER_BYTE * packed.shape[0], *packed.shape[1:])
    return codes if out_features is None else codes[:out_features]


def _drop_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): keep the first name of each."""
    seen, kept = set(), {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident not in seen:
            seen.add(ident)
            kept[key] = tensor.contiguous()
    return kept


def unpackable_layers(model: nn.Module) -> list[str]:
    """The layers ``patch_model`` would patch whose output size transformers' packed layout cannot hold (it stores
    ``out_features // 4`` rows): an unpatched model (even one on the meta device) can be checked before training."""
    return [name for name in find_block_linears(model) if model.get_submodule(name).out_features % VALUES_PER_BYTE]


def save_ternary_pretrained(dual: DualModel, path: str | Path, tokenizer=None) -> dict:
    """Export the student of a self-distilled model in transformers' bitnet format.

    Returns sizes: ``packed_bytes`` (codes + scales of the patched layers) and ``fp16_bytes`` (the same
    layers at 2 bytes per weight).
    """
    model, path = dual.model, Path(path)
    uneven = [name for name, layer in dual.layers.items() if layer.out_features % VALUES_PER_BYTE]
    if uneven:
        raise ValueError(
            f"transformers' BitLinear stores out_features // 4 packed rows, so every patched layer needs an "
            f"output size divisible by 4; these do not: {uneven[:5]}"
        )
    state: dict[str, torch.Tensor] = {}
    patched_params = {f"{name}.{leaf}" for name in dual.layers for leaf in ("weight", "bias")}
    for key, tensor in model.state_dict().items():
        if ".delta." not in key and key not in patched_params:
            state[key] = tensor
    packed_bytes = fp16_bytes = 0
    for name, layer in dual.layers.items():
        with torch.no_grad():
            codes, scale = ternary_weight(layer.student_weight())
        dtype = layer.weight.dtype
        state[f"{name}.weight"] = pack_ternary(codes).cpu()
        state[f"{name}.weight_scale"] = (1.0 / scale).reshape(1).to(dtype).cpu()
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias
        packed_bytes += state[f"{name}.weight"].numel() + state[f"{name}.weight_scale"].nbytes
        fp16_bytes += 2 * layer.weight.numel()

    path.mkdir(parents=True, exist_ok=True)
    save_file(_drop_shared(state), str(path / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    patched = set(dual.layers)
    config.quantization_config = {
        "quant_method": "bitnet",
        "linear_class": "bitlinear",
        "quantization_mode": "offline",
        # stock loading converts every nn.Linear it finds: name the ones we kept in full precision
        "modules_to_not_convert": sorted(
            name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in patched
        ),
        "use_rms_norm": False,
    }
    config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return {"path": str(path), "packed_bytes": packed_bytes, "fp16_bytes": fp16_bytes,
            "compression": fp16_bytes / max(packed_bytes, 1), "num_packed_layers": len(dual.layers)}


def freeze_ternary(model: nn.Module) -> list[str]:
    """Replace every ``BitLinear`` in ``model`` by a frozen ``TernaryLinear``; returns their names."""
    names = [name for name, m in model.named_modules() if isinstance(m, BitLinear)]
    for name in names:
        layer = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, TernaryLinear.from_latent(layer.weight, layer.bias))
    return names


def save_student(student: SuperpositionStudent, projector: Decompressor | None, path: str | Path) -> dict:
    """Save a superposition student (ternary layers packed) and its optional decompressor."""
    path = Path(path)
    frozen = copy.deepcopy(student).cpu()
    ternary = freeze_ternary(frozen)
    state = {}
    for key, tensor in frozen.state_dict().items():
        if key.endswith(".weight_codes"):
            key, tensor = key.replace(".weight_codes", ".weight_packed"), pack_ternary(tensor)
        state[f"student.{key}"] = tensor
    if projector is not None:
        state.update({f"projector.{k}": v.cpu() for k, v in projector.state_dict().items()})
    path.mkdir(parents=True, exist_ok=True)
    save_file(_drop_shared(state), str(path / "student.safetensors"), metadata={"format": STUDENT_FORMAT})
    meta = {
        "format": STUDENT_FORMAT,
        "version": STUDENT_FORMAT_VERSION,
        "student": student.config.to_dict(),
        "projector": projector.config if projector is not None else None,
        "ternary_layers": ternary,
    }
    (path / "student.json").write_text(json.dumps(meta, indent=2))
    packed = sum(v.numel() for k, v in state.items() if k.endswith(".weight_packed"))
    fp16 = sum(2 * frozen.get_submodule(n).weight_codes.numel() for n in ternary)
    return {"path": str(path), "packed_bytes": packed, "fp16_bytes": fp16, "compression": fp16 / max(packed, 1)}


def load_student(path: str | Path, device: str | torch.device = "cpu") -> tuple[SuperpositionStudent, Decompressor | None]:
    """Load what ``save_student`` wrote: an inference-ready student (frozen ternary layers) and projector."""
    path = Path(path)
    meta_file = path / "student.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} holds no superposition student (student.json missing); was it written by save_student?")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != STUDENT_FORMAT or meta.get("version", 0) > STUDENT_FORMAT_VERSION:
        raise ValueError(f"{meta_file}: unsupported format {meta.get('format')!r} version {meta.get('version')!r}")
    tensors = load_file(str(path / "student.safetensors"))
    student = SuperpositionStudent(**meta["student"])
    freeze_ternary(student)
    student_state = {}
    for key, tensor in tensors.items():
        if key.startswith("student."):
            key = key[len("student."):]
            if key.endswith(".weight_packed"):
                module = key[: -len(".weight_packed")]
                key = module + ".weight_codes"
                tensor = unpack_ternary(tensor, student.get_submodule(module).out_features)
            student_state[key] = tensor
    missing, unexpected = student.load_state_dict(student_state, strict=False)
    allowed_missing = {"lm_head.weight"} if student.config.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(f"{path}: student weights do not match student.json (missing {missing}, unexpected {unexpected})")
    projector = None
    if meta["projector"] is not None:
        projector = Decompressor(**meta["projector"])
        projector.load_state_dict({k[len("projector."):]: v for k, v in tensors.items() if k.startswith("projector.")})
        projector.to(device).eval()
    return student.to(device).eval(), projector
