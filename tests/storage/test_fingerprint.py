"""Fingerprints are stable across processes and dict orders and change with any input; a local directory is known
by its contents; the store's layout."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from storage import fingerprint, layout
from storage.fingerprint import directory_identity

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


def test_layout_paths():
    assert layout.shared_stage_dir("tokenize", "ab12") == "tokenize/ab12"
    stage = layout.run_stage_dir("run-1", "lm_head", "0123456789abcdef")
    assert stage == "runs/run-1/lm_head-0123456789"
    assert layout.checkpoint_dir(layout.checkpoints_dir(stage), 40) == "runs/run-1/lm_head-0123456789/checkpoints/step-40"
    assert layout.checkpoint_step("runs/x/checkpoints/step-40") == 40 and layout.checkpoint_step("tmp") is None
    assert layout.lock_dir(stage) == "locks/runs/run-1/lm_head-0123456789"
    assert layout.prefect_result(stage) == "runs/run-1/lm_head-0123456789.json"
    for bad, problem in (("", "a run name must be a non-empty name"), ("../escape", "may not contain '..'")):
        with pytest.raises(ValueError, match=problem):
            layout.run_stage_dir(bad, "evaluate", "ab" * 8)


def test_a_directory_is_known_by_its_contents_not_its_location_or_name(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x")
    (tmp_path / "a" / "README.md").write_text("docs")
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    identity = directory_identity(tmp_path / "a")
    assert identity == directory_identity(tmp_path / "elsewhere" / "b") and identity["files"] == 1
    assert directory_identity(tmp_path / "a", docs=True)["files"] == 2
    (tmp_path / "elsewhere" / "b" / "x.txt").write_text("y")
    assert directory_identity(tmp_path / "elsewhere" / "b") != identity
