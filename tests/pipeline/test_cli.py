"""The command line and teacher-loading errors a user meets first."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.config import ConfigError, TeacherConfig
from distill.teacher import load_teacher
from flows.__main__ import main

REPO = Path(__file__).resolve().parents[2]


def test_config_command_prints_the_resolved_configuration(capsys):
    assert main(["config", "quickstart", "--set", "train.steps=7", "--set", "data.seq_len=64"]) == 0
    out = capsys.readouterr().out
    assert "name: quickstart" in out and "steps: 7" in out and "seq_len: 64" in out


def test_bad_override_is_a_one_line_error_not_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "flows", "run", "self-distill", "--set", "train.steps=0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: invalid configuration: train.steps: Input should be greater than 0"]
    assert "Traceback" not in proc.stderr


def test_override_that_is_not_yaml_is_a_one_line_error(capsys):
    assert main(["config", "quickstart", "--set", "train.steps=["]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: override train.steps='[' is not valid YAML (expected the node content, but found '<stream end>' at "
        "line 1, column 2); quote a string that starts with [, {, : or *, e.g. --set 'key=\"[x\"'"]


def test_preset_file_that_is_not_yaml_is_a_one_line_error(tmp_path, capsys):
    preset = tmp_path / "broken.yaml"
    preset.write_text("train:\n  steps: [1\n")
    assert main(["config", str(preset)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {preset} is not valid YAML: expected ',' or ']'")


def test_help_lists_the_flows():
    proc = subprocess.run([sys.executable, "-m", "flows", "run", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "superposition-distill" in proc.stdout and "self-distill" in proc.stdout


def test_4bit_loading_says_what_it_needs_that_is_missing(tiny_teacher):
    """A CUDA device first (bitsandbytes' 4-bit layers run there), then bitsandbytes itself."""
    if not torch.cuda.is_available():
        expected = "teacher.load_in_4bit loads the teacher onto a CUDA device, but teacher.device is 'auto' \\(cpu"
    elif importlib.util.find_spec("bitsandbytes") is None:
        expected = "needs bitsandbytes: pip install 'bitnet-distill\\[quant4bit\\]'"
    else:
        pytest.skip("CUDA and bitsandbytes are both here")
    with pytest.raises(ConfigError, match=expected):
        load_teacher(TeacherConfig(name_or_path=str(tiny_teacher), load_in_4bit=True))


@pytest.mark.usefixtures("prefect_harness")
def test_run_both_prints_the_summary_table(tiny_teacher, tmp_path, capsys):
    from .conftest import TINY

    assert main(["run", "both", "--config", TINY, "--set", f"teacher.name_or_path={tiny_teacher}",
                 "--set", f"storage.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    for label in ("teacher perplexity", "naive ternary (PTQ) perplexity", "self-distilled student perplexity",
                  "superposition student perplexity", "superposition student packed size", "self-distilled student report"):
        assert label in out, label
    reports = [line.split()[-1] for line in out.splitlines() if " report " in line]
    assert len(reports) == 2 and all(Path(r).read_text().startswith("# ") for r in reports)
