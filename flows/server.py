"""A temporary Prefect API server that cannot outlive the process that started it.

Without ``PREFECT_API_URL``, every ``fcn-pipeline <stage>`` would start a
temporary server of its own (Prefect's ephemeral mode, about ten seconds), and
a stage killed with SIGKILL leaves that server running. Two entry points here
replace that:

- ``python -m flows.server -- COMMAND ...`` (what ``scripts/pipeline.sh`` runs
  around ``dvc repro``): one server for the whole command, with a throw-away
  ``PREFECT_HOME`` and SQLite database, its address exported in
  ``PREFECT_API_URL`` so every stage uses it; stopped when the command ends,
  fails or is interrupted, and the command's exit status is passed on.
- ``prefect_api()`` (the ``fcn-pipeline`` CLI): a stage run on its own gets a
  server for its run only. It keeps the Prefect home's database, as Prefect's
  own temporary server does, so a stage does not pay for a fresh database's
  migrations; its start overlaps the flow modules' imports.

The server (``prefect server start``) binds to 127.0.0.1 on a free port, sends
no telemetry, and runs in its own process group, stopped as a group (SIGTERM,
then SIGKILL after a grace period). On Linux it also asks the kernel for
SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), so even a SIGKILL of the
wrapper or of the stage takes the server down. With ``PREFECT_API_URL``
configured (say, the server of ``scripts/prefect-server.sh``) nothing is started.

Only the standard library is imported at module level: the CLI's spawned
workers import the CLI module, and Prefect is imported only when needed.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from fcn_pipeline.errors import PipelineError

# Seconds to wait for /api/health; a cold start on a busy 2-core machine can
# take a minute. The same variable bounds scripts/prefect-server.sh.
STARTUP_TIMEOUT_ENV = "FCN_PREFECT_START_TIMEOUT"
DEFAULT_STARTUP_TIMEOUT = 180.0
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL of the server's process group
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class PrefectServerError(PipelineError):
    """The temporary Prefect server did not start (the message quotes its log)."""


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` from the environment or, failing that, Prefect's settings
    (profile, ``prefect.toml``, a temporary setting of the running process)."""
    if url := os.environ.get("PREFECT_API_URL"):
        return url
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when this process dies.

    Linux only (``None`` elsewhere). The kernel sends it when the thread that
    started the child exits, however it exits, SIGKILL included.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the child
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it (so its pid, which is
    also its process group's id, cannot be reused while we still signal the group)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


def _signal_group(pgid: int, sig: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, sig)


class TemporaryServer:
    """One ``prefect server start`` on 127.0.0.1, in its own process group.

    ``own_database``: a throw-away ``PREFECT_HOME`` and SQLite database, deleted
    by ``stop()`` (a fresh database costs about 12 CPU seconds of migrations at
    start-up). Otherwise the server uses the configured Prefect home's database,
    as Prefect's own temporary server does (migrated once, then reused).
    ``start()`` launches it, ``wait_healthy()`` waits for ``/api/health``,
    ``stop()`` ends its process group and deletes its temporary home.
    """

    def __init__(self, own_database: bool = True) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="fcn-prefect-")) if own_database else None
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        # Its output, quoted if it fails; unnamed, so nothing is left behind.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115  (closed by stop())
        self.process: subprocess.Popen[bytes] | None = None

    def environment(self) -> dict[str, str]:
        """The server's environment: this one, loopback only, no telemetry, and
        the temporary home and database if it has its own."""
        env = dict(os.environ)
        env.pop("PREFECT_API_URL", None)
        env.update(
            PREFECT_SERVER_API_HOST="127.0.0.1",
            PREFECT_SERVER_API_PORT=str(self.port),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1",
        )
        if self.home is not None:
            env["PREFECT_HOME"] = str(self.home)
            database = f"sqlite+aiosqlite:///{self.home}/prefect.db"
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database
        return env

    def start(self) -> None:
        """Launch the server in its own process group (returns at once)."""
        command = [
            *(sys.executable, "-m", "prefect", "server", "start"),
            *("--host", "127.0.0.1", "--port", str(self.port), "--analytics-off"),
        ]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            start_new_session=True,  # its own process group, out of the terminal's Ctrl-C
            preexec_fn=die_with_parent(),
        )

    def healthy(self) -> bool:
        """Whether ``/api/health`` answers 200 (no proxy: the server is local)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float) -> None:
        """Return once the API answers; raise ``PrefectServerError`` if the server
        exits or does not answer within ``timeout`` seconds."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if _exited(self.process.pid):
                raise PrefectServerError(f"the temporary Prefect server exited{self._log_tail()}")
            if time.monotonic() > deadline:
                raise PrefectServerError(
                    f"the temporary Prefect server did not answer at {self.api_url} within "
                    f"{timeout:.0f} s (raise {STARTUP_TIMEOUT_ENV}){self._log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace`` seconds
        (and any process left in it), then delete its temporary home."""
        if self.process is not None:
            pid = self.process.pid
            if _exited(pid):  # it should not have: say why it stopped
                print(f"warning: the temporary Prefect server had exited{self._log_tail()}",
                      file=sys.stderr)  # fmt: skip
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while not _exited(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            _signal_group(pid, signal.SIGKILL)
            self.process.wait()
            self.process = None
        self.log.close()
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)

    def _log_tail(self, lines: int = 20) -> str:
        self.log.seek(0)
        tail = self.log.read().decode(errors="replace").splitlines()[-lines:]
        return "; last lines of its log:\n" + "\n".join(tail) if tail else ""


def startup_timeout() -> float:
    """``FCN_PREFECT_START_TIMEOUT`` seconds, default 180."""
    value = os.environ.get(STARTUP_TIMEOUT_ENV, "")
    try:
        return float(value) if value else DEFAULT_STARTUP_TIMEOUT
    except ValueError:
        raise PrefectServerError(f"{STARTUP_TIMEOUT_ENV}={value!r} is not a number") from None


@contextmanager
def temporary_server(timeout: float | None = None) -> Iterator[TemporaryServer]:
    """A healthy temporary server for the body of the ``with``; stopped on every
    way out (return, exception, KeyboardInterrupt)."""
    server = TemporaryServer()
    try:
        server.start()
        server.wait_healthy(startup_timeout() if timeout is None else timeout)
        yield server
    finally:
        server.stop()


@contextmanager
def prefect_api() -> Iterator[str]:
    """The configured Prefect API URL or, with none, a temporary server's, for this
    process's flows and its subprocesses during the body of the ``with``."""
    if url := configured_api_url():
        yield url
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = TemporaryServer(own_database=False)  # a single stage: skip the migrations
    try:
        server.start()
        # The flow modules' heaviest import loads while the server boots, not after.
        import prefect.flows  # noqa: F401

        server.wait_healthy(startup_timeout())
        os.environ["PREFECT_API_URL"] = server.api_url
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                send_pending_logs_and_events()
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def send_pending_logs_and_events(timeout: float = 30.0) -> None:
    """Have Prefect's background workers send what they still hold to the API.

    Left to themselves they do it at interpreter exit, after the server is gone,
    and then retry for a minute or more.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with suppress(RuntimeError):  # never started: nothing to send
            worker.drain_all(timeout=timeout)


class _Forward:
    """Signal handler of the runner: SIGINT/SIGTERM before the command starts
    abort (the server is stopped on the way out); once it runs, they are passed
    on to it and the runner waits for it to end."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.aborting = False

    def __call__(self, signum: int, frame: object) -> None:
        if self.child is None:
            if self.aborting:  # a second signal must not interrupt the clean-up
                return
            self.aborting = True
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        if signum == signal.SIGINT and _ctrl_c_reached_group():
            return  # the terminal sent it to the command as well: once is enough
        self.child.send_signal(signum)


def _ctrl_c_reached_group() -> bool:
    """Whether this process group is a terminal's foreground group, i.e. a SIGINT
    from the keyboard went to the command too (it shares the group)."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return True
        except OSError:
            continue
    return False


def run_with_server(command: list[str], timeout: float | None = None) -> int:
    """Run ``command`` with ``PREFECT_API_URL`` set to a temporary server and return
    its exit status (128 + N if signal N ended it).

    Meant for the main thread of a process that does nothing else: it installs
    SIGINT and SIGTERM handlers that pass those signals on to the command.
    """
    forward = _Forward()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    with temporary_server(timeout) as server:
        print(f"Prefect API for this run: {server.api_url} (temporary server, "
              "stopped at the end)", file=sys.stderr, flush=True)  # fmt: skip
        env = {**os.environ, "PREFECT_API_URL": server.api_url}
        forward.child = subprocess.Popen(command, env=env)
        return _status(forward.child.wait())


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.server",
        description="Run COMMAND with PREFECT_API_URL set: the configured Prefect API, or "
        "a temporary local server started for it and stopped when it ends.",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (usage: python -m flows.server -- COMMAND ...)")
    if configured_api_url():  # use it, start nothing: become the command
        try:
            os.execvp(command[0], command)
        except FileNotFoundError as error:
            print(f"{parser.prog}: error: {error}", file=sys.stderr)
            return 127
    try:
        return run_with_server(command)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except PrefectServerError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    except FileNotFoundError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
