"""Checkpoints: an exact resume (weights, AdamW and scheduler state, RNG), keep-last-K, latest, and damage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from storage import IncompleteArtifactError, IntegrityError
from storage.checkpoints import (decode_tree, encode_tree, latest_checkpoint, load_checkpoint, rng_state,
                                 save_checkpoint, set_rng_state)


def _trainer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    return model, optimizer, scheduler


def _steps(model, optimizer, scheduler, count: int) -> None:
    for _ in range(count):
        x = torch.randn(16, 4)  # drawn from the global RNG, which the checkpoint must restore
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def test_resume_continues_exactly(store):
    model, optimizer, scheduler = _trainer()
    _steps(model, optimizer, scheduler, 3)
    meta = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
            "data": {"epoch": 0, "position": 48}}
    path = save_checkpoint(store, "run-a", 3, dict(model.state_dict()), meta, keep_last=2)
    assert path == "runs/run-a/checkpoints/step-3" and store.is_complete(path)
    _steps(model, optimizer, scheduler, 2)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, optimizer, scheduler = _trainer()
    torch.manual_seed(123)  # whatever the new process did before resuming
    tensors, meta = load_checkpoint(store, latest_checkpoint(store, "run-a"))
    model.load_state_dict(tensors)
    optimizer.load_state_dict(meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    set_rng_state(meta["rng"])
    assert meta["data"] == {"epoch": 0, "position": 48}
    _steps(model, optimizer, scheduler, 2)
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[name]), name


def test_keep_last_k_and_latest(store):
    assert latest_checkpoint(store, "r") is None
    for step in (10, 20, 30, 40):
        save_checkpoint(store, "r", step, {"w": torch.full((2,), float(step))}, {"step": step}, keep_last=2)
    assert store.list("runs/r/checkpoints") == ["runs/r/checkpoints/step-30", "runs/r/checkpoints/step-40"]
    assert latest_checkpoint(store, "r") == "runs/r/checkpoints/step-40"
    store.write_bytes("runs/r/checkpoints/step-50/tensors.safetensors", b"half")  # a save killed midway
    assert latest_checkpoint(store, "r") == "runs/r/checkpoints/step-40"
    with pytest.raises(IncompleteArtifactError, match="step-50 is incomplete .* latest_checkpoint"):
        load_checkpoint(store, "runs/r/checkpoints/step-50")
    save_checkpoint(store, "r", 60, {"w": torch.zeros(2)}, {}, keep_last=2)
    assert store.list("runs/r/checkpoints") == ["runs/r/checkpoints/step-40", "runs/r/checkpoints/step-60"]
    tensors, meta = load_checkpoint(store, "runs/r/checkpoints/step-40")
    assert torch.equal(tensors["w"], torch.full((2,), 40.0)) and meta == {"step": 40}


def test_damaged_checkpoint_is_refused(local_store):
    path = save_checkpoint(local_store, "r", 1, {"w": torch.ones(3)}, {}, keep_last=1)
    data = bytearray(local_store.read_bytes(f"{path}/tensors.safetensors"))
    data[-1] ^= 0xFF
    local_store.write_bytes(f"{path}/tensors.safetensors", bytes(data))
    with pytest.raises(IntegrityError, match=r"step-1/tensors\.safetensors does not match the checksum"):
        load_checkpoint(local_store, path)


def test_shared_and_viewed_tensors_are_saved(local_store):
    weight = torch.randn(4, 4)
    tensors = {"embed": weight, "lm_head": weight, "row": weight[1], "t": weight.t()}  # tied, view, transposed
    loaded, _ = load_checkpoint(local_store, save_checkpoint(local_store, "r", 0, tensors, {}, keep_last=1))
    for name, value in tensors.items():
        assert torch.equal(loaded[name], value), name


def test_metadata_encoding_is_faithful():
    value = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}, 1: {}},
             "betas": (0.9, 0.999), "nested": [(1, "a"), None, math.inf], "array": np.arange(3, dtype=np.uint32),
             "__dunder": 1, "flag": True, "scalar": np.float32(0.5)}
    tensors: dict = {}
    encoded = encode_tree(value, tensors)
    decoded = decode_tree(encoded, tensors)
    assert decoded["betas"] == (0.9, 0.999) and decoded["nested"] == [(1, "a"), None, math.inf]
    assert set(decoded["state"]) == {0, 1} and torch.equal(decoded["state"][0]["exp_avg"], torch.ones(2))
    assert decoded["array"].dtype == np.uint32 and decoded["array"].tolist() == [0, 1, 2]
    assert decoded["__dunder"] == 1 and decoded["flag"] is True and decoded["scalar"] == 0.5
    with pytest.raises(TypeError, match="checkpoint metadata/bad is a object"):
        encode_tree({"bad": object()}, {})
