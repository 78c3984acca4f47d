"""The layer rule: ``bitnet/`` and ``storage/`` import neither Prefect (nor Ray) nor the layers above them, nor each
other. Checked on what importing every one of their modules loads, in a fresh interpreter."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"bitnet": {"prefect", "ray", "distill", "tasks", "flows", "storage"},
             "storage": {"prefect", "ray", "distill", "tasks", "flows", "bitnet", "transformers"}}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_ground_floor_package_loads_nothing_from_above_or_beside_it(package):
    modules = sorted(f"{package}.{p.stem}" for p in (REPO / package).glob("*.py") if p.stem != "__init__")
    code = (f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                       check=True, timeout=300).stdout)
    assert set(loaded) & FORBIDDEN[package] == set(), f"{package} loads {set(loaded) & FORBIDDEN[package]}"
