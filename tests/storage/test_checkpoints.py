"""Checkpoints: an exact resume (weights, AdamW and scheduler state, RNG), keep-last-K, latest, and damage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from storage import IncompleteArtifactError, IntegrityError
from storage.checkpoints import decode_tree, encode_tree, latest_checkpoint, load_checkpoint, save_checkpoint

from .helpers import run_on_tmpfs


def _adamw8bit(params, **kwargs):
    return pytest.importorskip("torchao.optim").AdamW8bit(params, **kwargs)


def _trainer(optimizer_class=torch.optim.AdamW):
    torch.manual_seed(0)
    # 64 x 128: large enough (>= 4096 elements) for AdamW8bit to keep its moments in 8 bits
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 2))
    optimizer = optimizer_class(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
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


@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, _adamw8bit], ids=["adamw", "adamw8bit"])
def test_resume_continues_exactly(store, optimizer_class):
    model, optimizer, scheduler = _trainer(optimizer_class)
    _steps(model, optimizer, scheduler, 3)
    meta = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
            "data": {"epoch": 0, "position": 48}}
    path = save_checkpoint(store, "runs/run-a/checkpoints", 3, dict(model.state_dict()), meta, keep_last=2)
    assert path == "runs/run-a/checkpoints/step-3" and store.is_complete(path)
    _steps(model, optimizer, scheduler, 2)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, optimizer, scheduler = _trainer(optimizer_class)
    torch.manual_seed(123)  # whatever the new process did before resuming
    tensors, meta = load_checkpoint(store, latest_checkpoint(store, "runs/run-a/checkpoints"))
    model.load_state_dict(tensors)
    optimizer.load_state_dict(meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(meta["rng"])
    assert meta["data"] == {"epoch": 0, "position": 48}
    _steps(model, optimizer, scheduler, 2)
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[name]), name


def test_8bit_optimiser_state_is_stored_as_its_8_bit_codes_and_rebuilt(local_store):
    model, optimizer, scheduler = _trainer(_adamw8bit)
    _steps(model, optimizer, scheduler, 2)
    path = save_checkpoint(local_store, "runs/r/checkpoints", 2, {}, {"optimizer": optimizer.state_dict()}, keep_last=1)
    from safetensors.torch import load_file

    stored = load_file(local_store.local_path(f"{path}/state.safetensors"))
    moments = optimizer.state[model[2].weight]
    (codes,) = [v for k, v in stored.items() if k.endswith("exp_avg/codes") and v.numel() == 128 * 64]
    assert codes.dtype == torch.uint8  # 8 bits on disk too, not a dequantized copy
    _, meta = load_checkpoint(local_store, path)
    restored = meta["optimizer"]["state"][2]["exp_avg"]
    assert type(restored) is type(moments["exp_avg"]) and restored.signed == moments["exp_avg"].signed
    assert torch.equal(restored.codes, moments["exp_avg"].codes) and torch.equal(restored.scale, moments["exp_avg"].scale)
    assert torch.equal(restored.dequantize(), moments["exp_avg"].dequantize())


def test_other_tensor_subclasses_are_refused_when_saving(local_store):
    from torch.testing._internal.two_tensor import TwoTensor  # a subclass torch's own tests use

    with pytest.raises(TypeError, match="metadata/state/w is a .*TwoTensor; tensor subclasses are stored only from"):
        save_checkpoint(local_store, "runs/r/checkpoints", 1, {}, {"state": {"w": TwoTensor(torch.ones(2), torch.zeros(2))}})
    assert latest_checkpoint(local_store, "runs/r/checkpoints") is None


def test_a_checkpoint_cannot_name_a_class_to_import():
    tampered = {"__tensor_subclass__": {"class": "os.system", "shape": [1], "stride": [1], "tensors": {},
                                        "attributes": []}}
    with pytest.raises(IntegrityError, match="class os.system, which is not one the checkpoint format rebuilds"):
        decode_tree(tampered, {})


def test_dtypes_round_trip_in_metadata():
    tensors: dict = {}
    value = {"dtype": torch.bfloat16, "pair": [True, torch.float32]}
    assert decode_tree(encode_tree(value, tensors), tensors) == value


def test_keep_last_k_and_latest(store):
    assert latest_checkpoint(store, "runs/r/checkpoints") is None
    for step in (10, 20, 30, 40):
        save_checkpoint(store, "runs/r/checkpoints", step, {"w": torch.full((2,), float(step))}, {"step": step}, keep_last=2)
    assert store.list("runs/r/checkpoints") == ["runs/r/checkpoints/step-30", "runs/r/checkpoints/step-40"]
    assert latest_checkpoint(store, "runs/r/checkpoints") == "runs/r/checkpoints/step-40"
    store.write_bytes("runs/r/checkpoints/step-50/tensors.safetensors", b"half")  # a save killed midway
    assert latest_checkpoint(store, "runs/r/checkpoints") == "runs/r/checkpoints/step-40"
    with pytest.raises(IncompleteArtifactError, match="step-50 is incomplete .* latest_checkpoint"):
        load_checkpoint(store, "runs/r/checkpoints/step-50")
    save_checkpoint(store, "runs/r/checkpoints", 60, {"w": torch.zeros(2)}, {}, keep_last=2)
    assert store.list("runs/r/checkpoints") == ["runs/r/checkpoints/step-40", "runs/r/checkpoints/step-60"]
    tensors, meta = load_checkpoint(store, "runs/r/checkpoints/step-40")
    assert torch.equal(tensors["w"], torch.full((2,), 40.0)) and meta == {"step": 40}


def test_damaged_checkpoint_is_refused(local_store):
    path = save_checkpoint(local_store, "runs/r/checkpoints", 1, {"w": torch.ones(3)}, {}, keep_last=1)
    data = bytearray(local_store.read_bytes(f"{path}/tensors.safetensors"))
    data[-1] ^= 0xFF
    local_store.write_bytes(f"{path}/tensors.safetensors", bytes(data))
    with pytest.raises(IntegrityError, match=r"step-1/tensors\.safetensors is missing or does not match the checksum"):
        load_checkpoint(local_store, path)


def test_a_checkpoint_missing_a_file_is_refused_by_name(store):
    path = save_checkpoint(store, "runs/r/checkpoints", 1, {"w": torch.ones(3)}, {}, keep_last=1)
    store.delete(f"{path}/state.safetensors")
    with pytest.raises(IntegrityError, match=r"step-1/state\.safetensors is missing or does not match the checksum "
                                             r"recorded when it was saved; delete this checkpoint to resume from the "
                                             r"previous one"):
        load_checkpoint(store, path)


def test_shared_and_viewed_tensors_are_saved(local_store):
    weight = torch.randn(4, 4)
    tensors = {"embed": weight, "lm_head": weight, "row": weight[1], "t": weight.t()}  # tied, view, transposed
    loaded, _ = load_checkpoint(local_store, save_checkpoint(local_store, "runs/r/checkpoints", 0, tensors, {}, keep_last=1))
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


STAGING_ON_A_FULL_DISK = """
import json, tempfile, torch
from storage import ArtifactStore, StoreError
from storage.checkpoints import latest_checkpoint, save_checkpoint
tempfile.tempdir = MOUNT  # where checkpoints are staged: a 1 MB tmpfs
store = ArtifactStore(ROOT)
out = {}
try:
    save_checkpoint(store, "run", 5, {"w": torch.zeros(1 << 19)}, {"lr": 0.1})  # 2 MB of weights
    out["error"] = None
except StoreError as exc:
    out["error"] = str(exc)
out["latest"] = latest_checkpoint(store, "run")
print(json.dumps(out))
"""


def test_a_full_temporary_disk_is_a_clear_error_and_leaves_no_checkpoint(tmp_path):
    mount = tmp_path / "tmp"
    out = run_on_tmpfs("size=1m", mount, f"MOUNT = {str(mount)!r}\nROOT = {str(tmp_path / 'store')!r}\n"
                       + STAGING_ON_A_FULL_DISK)
    assert out["error"].startswith(f"cannot stage checkpoint step 5 of run in the temporary directory {mount}/")
    assert "free space there or point TMPDIR at a disk with room" in out["error"]
    assert out["latest"] is None  # nothing that looks like a checkpoint to resume from
