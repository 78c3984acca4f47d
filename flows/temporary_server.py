"""Prefect's temporary server for the command line: out of the terminal's reach, and stopped with the command however
the command ends.

Where no Prefect server is configured, Prefect starts a temporary one in a child process and stops it from an exit
handler. Two things go wrong with that child as it is. Ctrl-C reaches the terminal's whole process group, so the
server dies at the moment the command, which handles the interrupt (a checkpoint, then a clean message), still
needs it, and the command hangs in the Prefect client's retries. And a command killed without running its exit
handlers (SIGKILL, the kernel's OOM killer, SIGHUP) leaves the server running for good. So the command starts the
server itself, as Prefect would but in a session of its own, with a watchdog process, also in a session of its own,
that reads a pipe whose write end only the command holds. The kernel closes that pipe when the command dies, however
it dies, and the watchdog then stops the server. A normal exit tells the watchdog first, and Prefect's own handler
stops the server as before.
"""

from __future__ import annotations

import atexit
import contextlib
import subprocess
import sys

# The watchdog reads lines: a server's pid (the latest is the one to stop), or "exit" for a normal exit. End of file
# without "exit" means the command is gone.
_WATCHDOG = """
import os, signal, sys, time
server = None
for line in sys.stdin:
    if line.strip() == "exit":
        sys.exit(0)
    server = int(line)
if server is not None:
    try:
        os.kill(server, signal.SIGTERM)
        for _ in range(100):  # 10 s to shut down, then SIGKILL
            time.sleep(0.1)
            os.kill(server, 0)
        os.kill(server, signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


class Watchdog:
    """A process that stops the process it was last told about once this process dies without exiting normally."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-c", _WATCHDOG], stdin=subprocess.PIPE, text=True,
                                        start_new_session=True)  # a kill of the command's process group spares it
        # atexit runs its handlers last registered first: this one runs before Prefect's own stops the server
        atexit.register(self.exiting_normally)

    def guard(self, pid: int) -> None:
        self._send(f"{pid}\n")

    def exiting_normally(self) -> None:
        self._send("exit\n")
        self.process.wait()

    def _send(self, line: str) -> None:
        try:
            self.process.stdin.write(line)
            self.process.stdin.flush()
        except OSError:  # the watchdog is gone already
            pass


def start_temporary_server() -> str | None:
    """Start Prefect's temporary server now, in a session of its own and guarded by a watchdog, unless a server is
    configured (``PREFECT_API_URL``) or temporary servers are switched off; its API URL, or None."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
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
    watchdog.guard(server.server_process.pid)
    return server.api_url


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
