"""Training checkpoints: ``<checkpoints directory>/step-<n>/``, the newest ``keep_last`` kept.

Each checkpoint directory holds
    ``tensors.safetensors``  the caller's tensors (model weights, RNG state tensors...)
    ``state.safetensors``    every tensor found inside ``metadata`` (e.g. AdamW's ``exp_avg``), by its path
    ``metadata.json``        ``metadata`` with those tensors replaced by references (see below)
    ``_COMPLETE.json``       written last: {step, sha256 of each file}

Why not ``torch.save`` of the whole state: a pickle executes code when loaded and is opaque to every tool but
torch. Here the tensors sit in safetensors (no code, memory-mappable, readable from any language) and the rest in
JSON that a person can read. The encoding is faithful for what optimiser and scheduler state dicts hold: tensors,
numbers (including NaN and inf), strings, None, lists, tuples (``{"__tuple__": [...]}``), dicts with non-string
keys such as parameter ids (``{"__items__": [[key, value], ...]}``), numpy arrays, torch dtypes, and the tensor
subclasses of 8-bit optimisers (torchao's ``OptimState8bit``): those are stored as the plain tensors they are made
of (``__tensor_flatten__``: the uint8 codes and their scales) and rebuilt with ``__tensor_unflatten__``, so their
state stays 8-bit on disk and resumes exactly. Only classes from ``TENSOR_SUBCLASS_MODULES`` are rebuilt: a
checkpoint must not be able to name code to import.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import layout
from .errors import IncompleteArtifactError, IntegrityError, StoreError
from .fingerprint import file_sha256

TENSORS, STATE, METADATA = "tensors.safetensors", "state.safetensors", "metadata.json"
_TENSOR, _NDARRAY, _TUPLE, _ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"
_DTYPE, _SUBCLASS = "__dtype__", "__tensor_subclass__"
TENSOR_SUBCLASS_MODULES = ("torchao.optim.",)


# ---- metadata with tensors inside <-> JSON + a flat dict of tensors --------------------------------------------

def encode_tree(value: Any, tensors: dict[str, torch.Tensor], where: str = "metadata") -> Any:
    """``value`` as JSON; tensors (and numpy arrays) go to ``tensors`` under their path and leave a reference."""
    if isinstance(value, torch.Tensor) and hasattr(type(value), "__tensor_flatten__"):
        return {_SUBCLASS: _encode_subclass(value, tensors, where)}
    if isinstance(value, torch.dtype):
        return {_DTYPE: str(value).removeprefix("torch.")}
    if isinstance(value, (torch.Tensor, np.ndarray)):
        name = where
        while name in tensors:  # two paths can spell alike ({1: x} and {"1": y}); keep both
            name += "'"
        tensors[name] = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))
        return {_TENSOR if isinstance(value, torch.Tensor) else _NDARRAY: name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {_TUPLE: [encode_tree(v, tensors, f"{where}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_tree(v, tensors, f"{where}/{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode_tree(v, tensors, f"{where}/{k}") for k, v in value.items()}
        return {_ITEMS: [[encode_tree(k, tensors, f"{where}/key"), encode_tree(v, tensors, f"{where}/{k}")]
                         for k, v in value.items()]}
    raise TypeError(f"checkpoint {where} is a {type(value).__name__}; metadata may hold tensors, numpy arrays, "
                    "numbers, strings, None, lists, tuples and dicts")


def _encode_subclass(value: torch.Tensor, tensors: dict[str, torch.Tensor], where: str) -> dict:
    cls = type(value)
    if not cls.__module__.startswith(TENSOR_SUBCLASS_MODULES):  # refused now rather than when resuming
        raise TypeError(f"checkpoint {where} is a {cls.__module__}.{cls.__qualname__}; tensor subclasses are stored "
                        f"only from {', '.join(TENSOR_SUBCLASS_MODULES)}")
    names, attributes = value.__tensor_flatten__()
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "shape": list(value.shape), "stride": list(value.stride()),
            "tensors": {n: encode_tree(getattr(value, n), tensors, f"{where}/{n}") for n in names},
            "attributes": encode_tree(attributes, tensors, f"{where}/attributes")}


def _decode_subclass(spec: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    import importlib

    module, _, name = spec["class"].rpartition(".")
    if not module.startswith(TENSOR_SUBCLASS_MODULES):
        raise IntegrityError(f"a checkpoint holds a tensor of class {spec['class']}, which is not one the checkpoint "
                             f"format rebuilds (classes from {', '.join(TENSOR_SUBCLASS_MODULES)}); it was not written "
                             "by this tool, or was altered")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise IntegrityError(f"a checkpoint holds a tensor of class {spec['class']}, which cannot be imported "
                             f"({exc}); install the library that wrote it (e.g. torchao)") from None
    inner = {n: decode_tree(v, tensors) for n, v in spec["tensors"].items()}
    return cls.__tensor_unflatten__(inner, decode_tree(spec["attributes"], tensors), torch.Size(spec["shape"]),
                                    tuple(spec["stride"]))


def decode_tree(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [decode_tree(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, content), = value.items()
        if tag == _TENSOR:
            return tensors[content]
        if tag == _NDARRAY:
            return tensors[content].numpy()
        if tag == _TUPLE:
            return tuple(decode_tree(v, tensors) for v in content)
        if tag == _ITEMS:
            return {_hashable(decode_tree(k, tensors)): decode_tree(v, tensors) for k, v in content}
        if tag == _DTYPE:
            return getattr(torch, content)
        if tag == _SUBCLASS:
            return _decode_subclass(content, tensors)
    return {k: decode_tree(v, tensors) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def _serializable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors accepts: contiguous, CPU, each owning its memory (views and shared storage are copied)."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage()
        if (not tensor.is_contiguous() or storage.nbytes() != tensor.nbytes or storage.data_ptr() in seen
                or tensor.storage_offset()):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


# ---- checkpoints -----------------------------------------------------------------------------------------------

def save_checkpoint(store, directory: str, step: int, tensors: dict[str, torch.Tensor], metadata: dict,
                    keep_last: int = 2) -> str:
    """Write checkpoint ``step`` under the checkpoints ``directory`` atomically (files first, completion marker last), then delete all but
    the ``keep_last`` highest complete steps (and debris of interrupted saves below them). Returns its path.

    The files go through a local temporary directory and are streamed to the store, so a checkpoint as large as the
    model and its optimiser state is never held twice in memory."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    path = layout.checkpoint_dir(directory, step)
    state: dict[str, torch.Tensor] = {}
    meta_json = {"step": int(step), "metadata": encode_tree(metadata, state)}
    store.unmark_complete(path)  # rewriting a step: it must not look complete while half-replaced
    hashes = {}
    with tempfile.TemporaryDirectory(prefix="checkpoint-") as tmp:
        try:
            save_file(_serializable(tensors), f"{tmp}/{TENSORS}")
            save_file(_serializable(state), f"{tmp}/{STATE}")
            Path(tmp, METADATA).write_text(json.dumps(meta_json, sort_keys=True))
        except (OSError, SafetensorError) as exc:  # a full or small temporary disk (a tmpfs holds it in memory)
            raise StoreError(f"cannot stage checkpoint step {step} of {directory} in the temporary directory {tmp} "
                             f"({exc}): it needs room for the trained weights and the optimiser state; free space "
                             "there or point TMPDIR at a disk with room, then rerun (it resumes from the last "
                             "checkpoint)") from exc
        for name in (TENSORS, STATE, METADATA):
            hashes[name] = file_sha256(f"{tmp}/{name}")
            store.put_file(f"{tmp}/{name}", f"{path}/{name}")
    store.mark_complete(path, {"step": int(step), "sha256": hashes})
    _prune(store, directory, keep_last)
    return path


def _steps(store, directory: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) of every checkpoint under ``directory``, by step."""
    found = []
    for entry in store.list(directory):
        step = layout.checkpoint_step(entry)
        if step is not None:
            found.append((step, entry, store.is_complete(entry)))
    return sorted(found)


def _prune(store, directory: str, keep_last: int) -> None:
    steps = _steps(store, directory)
    complete = [s for s, _, done in steps if done]
    if not complete:
        return
    keep = set(complete[-keep_last:])
    for step, path, _ in steps:
        if step not in keep and step < max(complete):
            store.delete(path)


def latest_checkpoint(store, directory: str) -> str | None:
    """Path of the highest complete checkpoint under ``directory``, or None."""
    complete = [path for _, path, done in _steps(store, directory) if done]
    return complete[-1] if complete else None


def load_checkpoint(store, path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` as saved (metadata gains nothing; the step is in the marker and ``metadata.json``).
    Every file is checked against the checksums recorded at save time."""
    try:
        manifest = store.read_manifest(path)
    except IncompleteArtifactError:
        raise IncompleteArtifactError(f"checkpoint {store.url(path)} is incomplete (its save was interrupted); "
                                      "load latest_checkpoint(store, directory) instead") from None
    with tempfile.TemporaryDirectory(prefix="checkpoint-") as tmp:
        files = {}
        for name in (TENSORS, STATE, METADATA):
            files[name] = str(store.local_path(f"{path}/{name}")) if store.is_local else f"{tmp}/{name}"
            try:
                if not store.is_local:
                    store.get_file(f"{path}/{name}", files[name])
                intact = file_sha256(files[name]) == manifest["sha256"][name]
            except FileNotFoundError:
                intact = False
            if not intact:
                raise IntegrityError(f"checkpoint file {store.url(path, name)} is missing or does not match the "
                                     "checksum recorded when it was saved; delete this checkpoint to resume from the "
                                     "previous one")
        meta_json = json.loads(Path(files[METADATA]).read_text())
        metadata = decode_tree(meta_json["metadata"], load_file(files[STATE]))
        return load_file(files[TENSORS]), metadata
