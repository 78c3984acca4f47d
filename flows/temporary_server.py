"""The temporary Prefect server of the command line: out of the terminal's reach, and stopped with the command
however the command ends.

Where no server is configured, Prefect would start a temporary one in a child process of the command and stop it
from an exit handler. Two things go wrong with that child. Ctrl-C reaches the terminal's whole process group, so the
server would die at the moment the command, which handles the interrupt (a checkpoint, then a clean message), still
needs it, and the command would hang in the Prefect client's retries. And a command killed without running its exit
handlers (SIGKILL, the kernel's OOM killer, SIGHUP) would leave the server running for good. So the command starts
Prefect's server itself, with Prefect's own command line (``prefect server start``), in a session of its own, and a
watchdog process, also in a session of its own, reads a pipe whose write end only the command holds: the kernel
closes that pipe when the command dies, however it dies, and the watchdog then stops the server. (POSIX only;
elsewhere Prefect starts its temporary server as it always does.)
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import time

# The watchdog reads lines: a server's pid (the latest is the one to stop), or "exit" for a normal exit. End of file
# without "exit" means the command is gone. Where the OS has pidfds (Linux 5.3+), the server is held by one, so a
# process that later gets the same pid is never signalled.
_WATCHDOG = """
import os, select, signal, sys, time

server = pidfd = None
for line in sys.stdin:
    if line.strip() == "exit":
        sys.exit(0)
    server = int(line)
    if pidfd is not None:
        os.close(pidfd)
        pidfd = None
    try:
        pidfd = os.pidfd_open(server)
    except ProcessLookupError:
        server = None
    except (AttributeError, OSError):
        pass  # no pidfds here: signal by pid


def send(sig):
    if pidfd is not None:
        signal.pidfd_send_signal(pidfd, sig)
    else:
        os.kill(server, sig)


def exits_within(seconds):
    if pidfd is not None:  # readable once the process has exited
        return bool(select.select([pidfd], [], [], seconds)[0])
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        os.kill(server, 0)  # ProcessLookupError once it is gone
        time.sleep(0.1)
    return False


if server is not None:
    try:
        send(signal.SIGTERM)
        if not exits_within(10):
            send(signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


class Watchdog:
    """A process that stops the process it was last told about once this process dies without exiting normally."""

    def __init__(self):
        # -I: nothing from the working directory (a local signal.py) is imported; a session of its own: a kill of
        # the command's process group spares it
        self.pid: int | None = None  # the process it stops
        self.process = subprocess.Popen([sys.executable, "-I", "-c", _WATCHDOG], stdin=subprocess.PIPE, text=True,
                                        start_new_session=True)
        # registered before the server starts, and so run after the handler that stops it: the watchdog stays
        # armed while the server is stopped
        atexit.register(self.exiting_normally)

    def guard(self, pid: int) -> None:
        self.pid = pid
        self._send(f"{pid}\n")

    def exiting_normally(self) -> None:
        self._send("exit\n")
        self.process.wait()

    def _send(self, line: str) -> None:
        try:
            self.process.stdin.write(line)
            self.process.stdin.flush()
        except (OSError, ValueError):  # the watchdog is gone already, or its pipe closed
            pass


class ServerUnreachable(RuntimeError):
    """The configured Prefect server does not answer; the message says how to start it or run without it."""


def check_configured_server(api_url: str, timeout: float = 5.0) -> None:
    """Fail at once, in one line, if the configured server does not answer (Prefect's client would retry, then end
    in a long traceback). Any HTTP answer counts, an authentication error included: the server is there."""
    import httpx

    try:
        httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout)
    except httpx.HTTPError as exc:
        raise ServerUnreachable(
            f"the Prefect server at {api_url} (PREFECT_API_URL) does not answer ({type(exc).__name__}: {exc}): start "
            "it (prefect server start), or unset PREFECT_API_URL (prefect config unset PREFECT_API_URL, or the "
            "environment variable) to run on a temporary server that stops with this command") from None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(api_url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{api_url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def start_temporary_server() -> str | None:
    """Start a temporary Prefect server for this command, unless one is configured (``PREFECT_API_URL``: then it
    must answer), temporary servers are switched off or this is not a POSIX system; its API URL, or None. The
    caller points Prefect at it (``prefect.settings.temporary_settings``)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value():
        check_configured_server(PREFECT_API_URL.value())
        return None
    if not PREFECT_SERVER_EPHEMERAL_ENABLED.value() or os.name != "posix":
        return None
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    print(f"Starting temporary server on {api_url.removesuffix('/api')}", file=sys.stderr, flush=True)
    watchdog = Watchdog()
    errors = tempfile.TemporaryFile()  # what it says if it fails to start (a pipe could fill up over a long run)
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui",
         "--no-services", "--log-level", "ERROR"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True)
    watchdog.guard(server.pid)

    def stop() -> None:  # registered after the watchdog's own handler, so it runs first
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    atexit.register(stop)
    deadline = time.monotonic() + float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 120))
    while not _answers(api_url):
        if server.poll() is not None:
            errors.seek(0)
            error = errors.read().decode(errors="replace").strip().splitlines()[-5:]
            raise ServerUnreachable(f"the temporary Prefect server exited at start ({server.returncode}): "
                                    f"{' / '.join(error)}")
        if time.monotonic() > deadline:
            raise ServerUnreachable("the temporary Prefect server did not answer within its startup timeout "
                                    "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); raise it on a busy machine")
        time.sleep(0.2)
    return api_url


def send_what_prefect_holds(timeout: float = 30.0) -> None:
    """Send the logs and events (task runs' states among them) that Prefect's background workers still hold to the
    temporary server, before the command leaves it: as Prefect's own test harness does before it stops its server.
    The workers are then closed, so a later flow in this process opens new ones to whatever server it is pointed at
    instead of writing to this one (a worker keeps the address it was opened with)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout)
    EventsWorker.drain_all(timeout=timeout)
