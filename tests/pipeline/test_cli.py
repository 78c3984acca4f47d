"""The command line and teacher-loading errors a user meets first."""

import contextlib
import importlib.util
import os
import re
import socket
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from distill.config import ConfigError, TeacherConfig, load_config
from distill.plan import open_store
from distill.teacher import Teacher
from flows.__main__ import main, plan_table

from ..storage.conftest import free_port
from .conftest import TINY, tiny_overrides

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


def test_a_configured_prefect_server_that_does_not_answer_is_a_one_line_error(tmp_path):
    port = free_port()  # nothing listens there
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    command = [sys.executable, "-m", "flows", "run", "self-distill", "--set", f"storage.root={tmp_path}"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: the Prefect server at http://127.0.0.1:{port}/api (PREFECT_API_URL) does not answer "
        "(ConnectError: [Errno 111] Connection refused): start it (prefect server start), or unset "
        "PREFECT_API_URL (prefect config unset PREFECT_API_URL, or the environment variable) to run on a "
        "temporary server that stops with this command"]


def test_a_preset_named_twice_differently_is_an_error(capsys):
    assert main(["config", "reference", "--config", "tinyllama"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "error: two configurations given, 'reference' and --config 'tinyllama': give one"


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
        Teacher(TeacherConfig(name_or_path=str(tiny_teacher), load_in_4bit=True)).load()


@pytest.mark.usefixtures("prefect_harness")
def plan_states(table: str) -> dict[tuple[str, str], str]:
    """The table ``python -m flows plan`` prints, as {(flow, stage): what a run would do}."""
    lines = table.splitlines()
    rows = lines[lines.index("") + 2:]  # after the runs' lines, a blank line and the header
    return {(row.split()[0], row.split()[1]): re.split(r"\s{2,}", row)[3] for row in rows}


def test_run_both_prints_the_summary_table(tiny_teacher, tmp_path, capsys):
    overrides = tiny_overrides(tiny_teacher, tmp_path)
    before = plan_states(plan_table(TINY, overrides, ["superposition-distill", "self-distill"]))
    assert set(before.values()) == {"runs"} and len(before) == 10, before  # 6 superposition + 4 self-distill stages
    assert main(["run", "both", "--config", TINY, "--set", f"teacher.name_or_path={tiny_teacher}",
                 "--set", f"storage.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    after = plan_states(plan_table(TINY, overrides, ["superposition-distill", "self-distill"]))
    assert after == dict.fromkeys(before, "finished: reused")
    for label in ("teacher perplexity", "naive ternary (PTQ) perplexity", "self-distilled student perplexity",
                  "superposition student perplexity", "superposition student packed size", "self-distilled student report"):
        assert label in out, label
    reports = [line.split()[-1] for line in out.splitlines() if " report " in line]
    assert len(reports) == 2 and all(Path(r).read_text().startswith("# ") for r in reports)
    ggufs = [line.split()[-4] for line in out.splitlines() if " llama.cpp file " in line]  # path (size MiB, type)
    assert len(ggufs) == 2 and all(Path(g).name == "student.gguf" and Path(g).exists() for g in ggufs)


class RunningCommand:
    """``python -m flows run self-distill`` on the tiny config in a session of its own (so that a signal can reach
    its process group as the terminal's Ctrl-C does), with no Prefect server configured; its output collected."""

    def __init__(self, tiny_teacher, tmp_path, **overrides):
        self.overrides = tiny_overrides(tiny_teacher, tmp_path, **overrides)
        command = [sys.executable, "-m", "flows", "run", "self-distill", "--config", TINY,
                   *(arg for key, value in self.overrides.items() for arg in ("--set", f"{key}={value}"))]
        env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect")}
        self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._collect, daemon=True)
        self.reader.start()

    def _collect(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> None:
        """Whatever is left of its process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, what: str, found, seconds: float = 180):
        deadline = time.monotonic() + seconds
        while not (result := found()):
            assert self.proc.poll() is None, f"the command ended before {what}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} after {seconds} s:\n{self.output()[-3000:]}"
            time.sleep(0.05)
        return result

    def server_port(self) -> int:
        """The temporary server's port, once it answers."""
        started = self.wait_for("temporary server", lambda: re.search(
            r"Starting temporary server on http://127\.0\.0\.1:(\d+)", self.output()))
        port = int(started.group(1))
        self.wait_for("answer from the temporary server", lambda: _serving(port))
        return port


def _serving(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stops_serving(port: int, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while _serving(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_watchdog_stops_its_process_only_when_the_command_dies():
    from flows.temporary_server import Watchdog

    guarded = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(2)]
    try:
        for process, normal_exit in zip(guarded, (True, False)):
            watchdog = Watchdog()
            watchdog.guard(process.pid)
            if normal_exit:
                watchdog.exiting_normally()
            else:  # what the kernel does to the pipe when the command dies
                watchdog.process.stdin.close()
                watchdog.process.wait(timeout=30)
        assert guarded[0].poll() is None  # left to Prefect's own handler
        assert guarded[1].wait(timeout=30) == -signal.SIGTERM
    finally:
        for process in guarded:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_a_killed_command_takes_its_temporary_prefect_server_with_it(tiny_teacher, tmp_path):
    """SIGKILL (the OOM killer's signal, to one process) runs no exit handler; the server the command started must
    stop anyway."""
    command = RunningCommand(tiny_teacher, tmp_path, **{"train.steps": 100_000})  # still running when killed
    try:
        port = command.server_port()
        os.kill(command.proc.pid, signal.SIGKILL)
        command.proc.wait()
        assert _stops_serving(port), f"the temporary server on port {port} outlived the killed command"
    finally:
        command.stop()


@pytest.mark.slow
def test_ctrl_c_stops_training_at_a_checkpoint_and_the_command_exits(tiny_teacher, tmp_path):
    """The terminal's SIGINT reaches the command's whole process group; the temporary server must not die of it
    while the command still reports to it."""
    command = RunningCommand(tiny_teacher, tmp_path, **{"train.steps": 100_000, "train.checkpoint_every": 3,
                                                        "train.eval_every": 1000})
    try:
        port = command.server_port()
        store = open_store(load_config(TINY, command.overrides))
        command.wait_for("checkpoint", lambda: [p for p in store.find("runs") if "/checkpoints/step-" in p])
        os.killpg(command.proc.pid, signal.SIGINT)
        command.proc.wait(timeout=120)
    finally:
        command.stop()
    command.reader.join(timeout=10)
    assert command.proc.returncode == 2, command.output()[-3000:]
    stopped = re.search(r"error: .*stopped by signal 2 at step (\d+); a checkpoint was written, rerun to resume",
                        command.output())
    assert stopped, command.output()[-3000:]
    assert _stops_serving(port), f"the temporary server on port {port} outlived the command"
    plan = subprocess.run([sys.executable, "-m", "flows", "plan", "self-distill", "--config", TINY,
                           *(f"--set={key}={value}" for key, value in command.overrides.items())],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert plan_states(plan.stdout) == {("self-distill", "tokenize"): "finished: reused",
                                        ("self-distill", "self_distill"): f"resumes from step {stopped.group(1)} of 100000",
                                        ("self-distill", "evaluate"): "runs", ("self-distill", "export"): "runs"}
