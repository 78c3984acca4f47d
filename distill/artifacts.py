"""Small helpers for stages that write tensors and directories through the artifact store."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors


def stage_finished(store, path: str) -> bool:
    """The stage at ``path`` is finished: its completion marker, and that of every split its manifest lists. A split
    reopened on its own (``TeacherCacheReader.verify(repair=True)`` withdraws its marker; or it was deleted) makes
    its stage unfinished, so the next run redoes what is missing instead of returning the stored manifest."""
    if not store.is_complete(path):
        return False
    splits = store.read_manifest(path).get("splits", {})
    return all(store.is_complete(f"{path}/{split}") for split in splits)


def write_tensors(store, path: str, tensors: dict[str, torch.Tensor]) -> None:
    store.write_bytes(path, save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def read_tensors(store, path: str) -> dict[str, torch.Tensor]:
    return load_safetensors(store.read_bytes(path))


def finish_training(store, stage: dict, history: list[dict], tensors: dict[str, torch.Tensor], **extra) -> dict:
    """Write the trained tensors and loss history, mark the stage complete, return its manifest."""
    path = stage["path"]
    store.remove_temporaries(path)  # a killed earlier attempt's half-written files: never part of a finished stage
    write_tensors(store, f"{path}/weights.safetensors", tensors)
    store.write_json(f"{path}/history.json", history)
    manifest = {"stage": stage["name"], "fingerprint": stage["fingerprint"], "path": path,
                "weights": f"{path}/weights.safetensors", "history": f"{path}/history.json",
                "checkpoint_run": stage["checkpoint_run"], "steps": len(history),
                "final_loss": history[-1]["loss"] if history else None, **extra}
    store.mark_complete(path, manifest)
    return manifest


def save_directory(store, path: str, write) -> None:
    """Let ``write(local_dir)`` fill a temporary directory (e.g. ``save_pretrained``), then upload it to ``path``,
    without the half-written files a killed earlier upload left there (the exported student's directory is uploaded
    to the Hub as it is)."""
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        store.remove_temporaries(path)
        store.upload_dir(tmp, path)
