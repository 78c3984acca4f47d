"""What the fingerprints know of the teacher and the data: a local teacher by its files' contents, not by its
location or its directory's name; a Hub teacher by its commit; a Hub dataset by the commit its revision names (asked
of a stand-in Hub on 127.0.0.1), all without loading weights or the network."""

from __future__ import annotations

import shutil
from pathlib import Path

from distill.data import hub_dataset_commit
from distill.teacher import hub_commit, identity


def _model_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"hidden_size": 8}')
    (root / "model.safetensors").write_bytes(b"weights-v1")
    (root / "tokenizer.json").write_text('{"vocab": {}}')
    (root / "README.md").write_text("docs")
    return root


def test_local_model_identity_is_content_not_location_or_name(tmp_path):
    model = _model_dir(tmp_path / "teacher")
    known = identity(str(model))
    assert known["files"] == 3 and "name" not in known
    copy = tmp_path / "elsewhere" / "teacher-copy"  # a copy under another name is the same teacher
    shutil.copytree(model, copy)
    assert identity(str(copy)) == known
    (copy / "README.md").write_text("other docs")  # documentation is not the model
    assert identity(str(copy)) == known
    tokenizer = identity(str(model), tokenizer_only=True)
    (copy / "model.safetensors").write_bytes(b"weights-v2")
    assert identity(str(copy))["sha256"] != known["sha256"]
    assert identity(str(copy), tokenizer_only=True) == tokenizer  # new weights, same tokenizer: the shards stay
    (copy / "tokenizer.json").write_text('{"vocab": {"a": 0}}')
    assert identity(str(copy), tokenizer_only=True) != tokenizer


def test_hub_identity_uses_the_commit_hash(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert identity("org/model", revision=commit)["commit"] == commit
    assert identity("org/model") == {"name": "org/model", "revision": "main", "commit": None}
    repo = tmp_path / "models--org--model"  # the Hugging Face cache layout
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    assert hub_commit("org/model", cache_dir=tmp_path) == commit
    assert identity("org/model", tokenizer_only=True)["commit"] == commit


def test_hub_dataset_commit_asks_the_hub_then_the_local_cache(fake_hub, monkeypatch, tmp_path):
    from huggingface_hub import constants

    commit, tagged, cached = "1" * 40, "2" * 40, "3" * 40
    fake_hub.commits["org/data"] = {"main": commit, "v1": tagged}
    assert hub_dataset_commit("org/data") == commit
    assert hub_dataset_commit("org/data", "v1") == tagged
    assert fake_hub.requests == ["/api/datasets/org/data", "/api/datasets/org/data/revision/v1"]
    assert hub_dataset_commit("org/data", cached) == cached and len(fake_hub.requests) == 2  # a commit: no request
    assert hub_dataset_commit("org/other") is None  # unknown to the Hub, not cached

    refs = tmp_path / "hf-cache" / "datasets--org--data" / "refs"
    (refs / "dev").write_text(cached)  # a branch since deleted upstream: the Hub's answer wins over the stale ref
    assert hub_dataset_commit("org/data", "dev") is None
    fake_hub.down = True  # a server error is no answer: the cache's ref stands in
    assert hub_dataset_commit("org/data", "dev") == cached
    fake_hub.down = False

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline: only the cache's refs can tell
    assert (refs / "main").read_text() == commit  # written when the Hub answered, as hf_hub_download writes refs
    assert hub_dataset_commit("org/data") == commit and hub_dataset_commit("org/data", "v1") == tagged
    (refs / "main").write_text(cached)
    assert hub_dataset_commit("org/data") == cached
    assert hub_dataset_commit("org/data", "v2") is None
    (refs / "main").write_text("not a commit")
    assert hub_dataset_commit("org/data") is None
    assert len(fake_hub.requests) == 5  # up to the two for dev; none while offline
