"""Small helpers for stages that write tensors and directories through the artifact store."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from storage import layout
from storage.lease import holding_lock

WRITE_LOCK_TIMEOUT_S = 3600.0  # how long a second run waits for another writing the same stage directory


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


@contextmanager
def writing_stage(store, path: str):
    """Hold the lock of the stage directory at ``path`` while it is written and marked complete, after clearing the
    hidden temporaries a killed earlier attempt left there (they must never be part of a finished stage: the
    exported student's directory is uploaded to the Hub as it is). Only under the lock is that safe: another run of
    the same stage may be writing its own temporaries at that moment."""
    with holding_lock(store, layout.lock_dir(path), f"the stage directory {store.url(path)}", WRITE_LOCK_TIMEOUT_S):
        store.remove_temporaries(path)
        yield


def finish_training(store, stage: dict, history: list[dict], tensors: dict[str, torch.Tensor], **extra) -> dict:
    """Write the trained tensors and loss history, mark the stage complete, return its manifest."""
    path = stage["path"]
    manifest = {"stage": stage["name"], "fingerprint": stage["fingerprint"], "path": path,
                "weights": f"{path}/weights.safetensors", "history": f"{path}/history.json",
                "checkpoint_run": stage["checkpoint_run"], "steps": len(history),
                "final_loss": history[-1]["loss"] if history else None, **extra}
    with writing_stage(store, path):
        write_tensors(store, manifest["weights"], tensors)
        store.write_json(manifest["history"], history)
        store.mark_complete(path, manifest)
    return manifest


def save_directory(store, path: str, write: Callable[[Path], None], manifest: Callable[[], dict]) -> dict:
    """Let ``write(local_dir)`` fill a temporary directory (e.g. ``save_pretrained``), upload it to ``path`` and mark
    that complete with ``manifest()`` (called after ``write``); returns the manifest."""
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        with writing_stage(store, path):
            store.upload_dir(tmp, path)
            store.mark_complete(path, finished := manifest())
    return finished
