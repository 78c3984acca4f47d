"""Named tensors as one safetensors file in the store (trained weights, dW): no pickle, readable from any language."""

from __future__ import annotations

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors


def write_tensors(store, path: str, tensors: dict[str, torch.Tensor]) -> None:
    store.write_bytes(path, save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def read_tensors(store, path: str) -> dict[str, torch.Tensor]:
    return load_safetensors(store.read_bytes(path))
