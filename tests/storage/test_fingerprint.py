"""Fingerprints are stable across processes and dict orders and change with any input; model and tokenizer
identities come from file contents (local) or commit hashes (Hub), without transformers or network (a Hub
dataset's commit is asked of a stand-in Hub on 127.0.0.1)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from storage import fingerprint, layout, model_identity, tokenizer_identity
from storage.fingerprint import hub_dataset_commit

from .helpers import run_python

CONFIG = {"data": {"seq_len": 128, "dataset": "stdlib"}, "layers": (1, 2), "lr": 1e-4, "path": Path("a/b")}


def test_stable_across_dict_order_and_processes():
    reordered = {"path": Path("a/b"), "lr": 1e-4, "layers": [1, 2], "data": {"dataset": "stdlib", "seq_len": 128}}
    assert fingerprint(CONFIG, "up") == fingerprint(reordered, "up")
    code = ("from pathlib import Path; from storage import fingerprint; "
            "print(fingerprint({'lr': 1e-4, 'data': {'dataset': 'stdlib', 'seq_len': 128}, 'layers': (1, 2), "
            "'path': Path('a/b')}, 'up'))")
    for seed in ("1", "2"):  # another process, another hash seed
        child = run_python(code, env_extra={"PYTHONHASHSEED": seed})
        assert child.stdout.strip() == fingerprint(CONFIG, "up"), child.stderr


def test_any_change_changes_the_fingerprint():
    base = fingerprint(CONFIG, "up")
    assert len(base) == 16 and int(base, 16) >= 0
    assert fingerprint(CONFIG, "other") != base
    assert fingerprint(CONFIG) != base
    assert fingerprint({**CONFIG, "lr": 2e-4}, "up") != base
    assert fingerprint({**CONFIG, "data": {"seq_len": 129, "dataset": "stdlib"}}, "up") != base


def test_dataclasses_and_unhashable_values():
    @dataclasses.dataclass
    class Section:
        width: int = 3

    assert fingerprint({"s": Section()}) == fingerprint({"s": {"width": 3}})
    with pytest.raises(TypeError, match=r"config\.fn: a builtin_function_or_method has no stable text form"):
        fingerprint({"fn": print})
    with pytest.raises(TypeError, match="key 1 is a int, not a string"):
        fingerprint({1: "x"})


def _model_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"hidden_size": 8}')
    (root / "model.safetensors").write_bytes(b"weights-v1")
    (root / "tokenizer.json").write_text('{"vocab": {}}')
    (root / "README.md").write_text("docs")
    return root


def test_local_model_identity_is_content_not_location(tmp_path):
    model = _model_dir(tmp_path / "teacher")
    identity = model_identity(model)
    assert identity["name"] == "teacher" and identity["files"] == 3
    copy = tmp_path / "elsewhere" / "teacher"
    shutil.copytree(model, copy)
    assert model_identity(copy) == identity
    (copy / "README.md").write_text("other docs")  # documentation is not the model
    assert model_identity(copy) == identity
    tokenizer = tokenizer_identity(model)
    (copy / "model.safetensors").write_bytes(b"weights-v2")
    assert model_identity(copy)["sha256"] != identity["sha256"]
    assert tokenizer_identity(copy) == tokenizer  # new weights, same tokenizer: token shards stay valid
    (copy / "tokenizer.json").write_text('{"vocab": {"a": 0}}')
    assert tokenizer_identity(copy) != tokenizer


def test_hub_identity_uses_the_commit_hash(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert model_identity("org/model", revision=commit, cache_dir=tmp_path)["commit"] == commit
    assert model_identity("org/model", cache_dir=tmp_path) == {"name": "org/model", "revision": "main",
                                                               "commit": None}
    repo = tmp_path / "models--org--model"  # the Hugging Face cache layout
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    assert model_identity("org/model", cache_dir=tmp_path)["commit"] == commit
    assert tokenizer_identity("org/model", cache_dir=tmp_path)["commit"] == commit


def test_layout_paths():
    assert layout.tokens_dir("ab12") == "tokens/ab12"
    assert layout.teacher_cache_dir("cd34") == "teacher-cache/cd34"
    head = layout.lm_head_run("run-1", "0123456789abcdef")
    assert layout.checkpoint_dir(head, 40) == "runs/run-1/lm-head-0123456789/checkpoints/step-40"
    assert layout.checkpoint_step("runs/x/checkpoints/step-40") == 40 and layout.checkpoint_step("tmp") is None
    assert (layout.student_dir("r", "ffee" * 10), layout.eval_dir("r", "ab" * 20)) == ("runs/r/student-ffeeffeeff",
                                                                                   "runs/r/eval-ababababab")
    for bad, problem in (("", "a run name must be a non-empty name"), ("../escape", "may not contain '..'")):
        with pytest.raises(ValueError, match=problem):
            layout.run_dir(bad)


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
