"""Prefect's temporary server for the command line: out of the terminal's reach, and stopped with the command
however the command ends.

Where no Prefect server is configured, Prefect starts a temporary one in a child process and stops it from an exit
handler. Two things go wrong with that child as it is. Ctrl-C reaches the terminal's whole process group, so the
server dies at the moment the command, which handles the interrupt (a checkpoint, then a clean message), still
needs it, and the command hangs in the Prefect client's retries. And a command killed without running its exit
handlers (SIGKILL, the kernel's OOM killer, SIGHUP) leaves the server running for good. So the command starts the
server itself, as Prefect would but in a session of its own, with a watchdog process, also in a session of its own,
that reads a pipe whose write end only the command holds. The kernel closes that pipe when the command dies, however
it dies, and the watchdog then stops the server. On a normal exit Prefect's own handler stops the server as before,
and then the watchdog is told to leave it be. (POSIX only; elsewhere Prefect starts its server as it always does.)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys

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
        # registered before the server starts, and so run after the handler Prefect registers then: the watchdog
        # stays armed while Prefect stops the server
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


_api_url: str | None = None  # the server this process started


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


def start_temporary_server() -> str | None:
    """Start Prefect's temporary server now, in a session of its own and guarded by a watchdog, unless a server is
    configured (``PREFECT_API_URL``), temporary servers are switched off or this is not a POSIX system; its API URL,
    or None. Calling it again returns the same server."""
    global _api_url
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() and not _api_url:
        check_configured_server(PREFECT_API_URL.value())
        return None
    if _api_url or not PREFECT_SERVER_EPHEMERAL_ENABLED.value() or os.name != "posix":
        return _api_url
    import prefect.server.api.server as prefect_server

    server = prefect_server.SubprocessASGIServer()  # the instance Prefect's clients use: they find it running
    watchdog = Watchdog()
    spawn = getattr(server, "_run_uvicorn_command", None)
    if callable(spawn):  # guarded from the moment it exists, not only once it answers (seconds later)
        def spawn_guarded():
            with _own_session_for_children_of(prefect_server):
                process = spawn()
            watchdog.guard(process.pid)
            return process

        server._run_uvicorn_command = spawn_guarded
    server.start()
    if watchdog.pid != server.server_process.pid:  # started without the hook (or already running)
        watchdog.guard(server.server_process.pid)
    _api_url = server.api_url
    return _api_url


@contextlib.contextmanager
def _own_session_for_children_of(module):
    """While active, the processes ``module`` starts with ``subprocess.Popen`` get a session of their own. Prefect's
    own command line for its server is kept; only where it runs changes. (Without a module-level ``subprocess`` to
    stand in for, the server stays in the command's session: reached by Ctrl-C, as without this module.)"""
    if getattr(module, "subprocess", None) is not subprocess:
        yield
        return

    class InItsOwnSession:
        def __getattr__(self, name):
            return getattr(subprocess, name)

        @staticmethod
        def Popen(*args, **kwargs):
            return subprocess.Popen(*args, **{"start_new_session": True, **kwargs})

    module.subprocess = InItsOwnSession()
    try:
        yield
    finally:
        module.subprocess = subprocess
