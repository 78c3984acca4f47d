"""The command line and teacher-loading errors a user meets first."""

import subprocess
import sys
from pathlib import Path

import pytest

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


def test_help_lists_the_flows():
    proc = subprocess.run([sys.executable, "-m", "flows", "run", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "superposition-distill" in proc.stdout and "self-distill" in proc.stdout


def test_4bit_loading_without_bitsandbytes_says_how_to_get_it(tiny_teacher):
    pytest.importorskip("transformers")
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="needs bitsandbytes: pip install 'bitnet-distill\\[quant4bit\\]'"):
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
