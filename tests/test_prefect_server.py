"""flows.server: one temporary Prefect server per run, and none left behind.

The slow tests start real servers (10 s to a minute each on a busy 2-core
machine). Processes are found through /proc (Linux): a server by the
``--port N`` of its command line, descendants by their parent pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from itertools import pairwise
from pathlib import Path

import pytest
import yaml

from flows import server
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")

STARTUP = 300  # seconds allowed for a cold server start on a loaded machine


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still alive after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def port_arg(pid: int) -> int | None:
    """The ``--port N`` of a process's command line (Prefect servers, uvicorn)."""
    args = cmdline(pid)
    for flag, value in pairwise(args):
        if flag == "--port" and value.isdigit():
            return int(value)
    return None


def pids_with_port(port: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and
            port_arg(int(p.name)) == port and alive(int(p.name))]  # fmt: skip


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` in the process tree."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found: list[int] = []
    frontier = {root}
    while frontier:
        children = {pid for pid, ppid in parent.items() if ppid in frontier} - set(found)
        found += children
        frontier = children
    return [pid for pid in found if alive(pid)]


def healthy(port: int | None) -> bool:
    """Whether a Prefect API on 127.0.0.1:``port`` answers ``/api/health``."""
    if port is None:
        return False
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def listen_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


# The command the runner wraps: reports what it sees of the server, then sleeps
# (to be signalled) and exits with the status it is given.
CHILD = """
import json, os, sys, time, urllib.request
from tests.test_prefect_server import listen_addresses, pids_with_port
url = os.environ["PREFECT_API_URL"]
port = int(url.split(":")[2].split("/")[0])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
servers = pids_with_port(port)
homes = [line.split("=", 1)[1] for pid in servers
         for line in open(f"/proc/{pid}/environ").read().split("\\0")
         if line.startswith("PREFECT_HOME=")]
report = dict(url=url, pid=os.getpid(), servers=servers, homes=homes,
              health=opener.open(url + "/health").read().decode(),
              listen=sorted(listen_addresses(port)))
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(report, f)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(float(sys.argv[2]))
sys.exit(int(sys.argv[3]))
"""


def child_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def start_runner(tmp_path: Path, sleep: float, code: int) -> tuple[subprocess.Popen, Path]:
    """``python -m flows.server -- python CHILD`` in its own process group."""
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "flows.server", "--",
               sys.executable, "-c", CHILD, str(report), str(sleep), str(code)]  # fmt: skip
    runner = subprocess.Popen(command, cwd=tmp_path, env=child_env(), start_new_session=True)
    return runner, report


def wait_report(runner: subprocess.Popen, report: Path) -> dict:
    deadline = time.monotonic() + STARTUP
    while not report.exists():
        assert runner.poll() is None, f"the runner exited with {runner.returncode} first"
        assert time.monotonic() < deadline, "no report from the child: the server did not start"
        time.sleep(0.2)
    return json.loads(report.read_text())


def check_server(seen: dict) -> None:
    """What the child saw: one server, on 127.0.0.1 only, healthy, own home."""
    assert seen["url"].startswith("http://127.0.0.1:") and seen["url"].endswith("/api")
    assert seen["health"] == "true"
    assert seen["listen"] == ["0100007F"]  # 127.0.0.1, nothing on other interfaces
    assert len(seen["servers"]) == 1 and len(seen["homes"]) == 1
    assert Path(seen["homes"][0]).name.startswith("fcn-prefect-")


def test_die_with_parent_kills_the_child_when_its_parent_is_sigkilled(tmp_path):
    # A parent that starts `sleep` with the preexec function, then waits.
    code = (
        "import subprocess, sys, time\n"
        "from flows.server import die_with_parent\n"
        "child = subprocess.Popen(['sleep', '60'], preexec_fn=die_with_parent())\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], env=child_env(),
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    sleeper = int(parent.stdout.readline())
    assert alive(sleeper)
    parent.kill()
    parent.wait()
    assert wait_gone([sleeper], 5) == []


def test_runner_with_a_configured_api_starts_nothing(tmp_path):
    env = {**child_env(), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    script = 'echo "$PREFECT_API_URL"; exit 3'
    command = [sys.executable, "-m", "flows.server", "--", "sh", "-c", script]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stdout.strip() == "http://127.0.0.1:9/api"
    assert "temporary server" not in done.stderr


def test_runner_without_a_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        server.main(["--"])
    assert exit_.value.code == 2
    assert "no command given" in capsys.readouterr().err


def test_prefect_api_uses_the_configured_server(prefect_api_url, monkeypatch):
    def no_server(self):
        raise AssertionError("a server was started although PREFECT_API_URL is set")

    monkeypatch.setattr(server.TemporaryServer, "start", no_server)
    with server.prefect_api() as url:
        assert url == prefect_api_url


def test_a_server_that_does_not_start_is_reported_and_removed(monkeypatch, tmp_path):
    # A "server" that exits at once: the error quotes its log, nothing is left.
    monkeypatch.setattr(sys, "executable", "/bin/sh")  # `sh -m prefect ...` fails at once
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    failed = pytest.raises(server.PrefectServerError, match="exited; last lines of its log")
    with failed, server.temporary_server(timeout=30):
        pass
    assert list(tmp_path.iterdir()) == []  # its temporary home is gone


@pytest.mark.slow
@pytest.mark.parametrize("code", [0, 7])
def test_runner_serves_the_command_and_stops_after_it_exits(tmp_path, code):
    runner, report = start_runner(tmp_path, sleep=0, code=code)
    assert runner.wait(timeout=STARTUP) == code  # the command's status, passed on
    seen = json.loads(report.read_text())
    check_server(seen)
    assert wait_gone(seen["servers"], 1) == []  # stopped before the runner returned
    assert not Path(seen["homes"][0]).exists()  # its database with it


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "to_group"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],  # SIGINT as a terminal's Ctrl-C sends it
    ids=["sigterm", "ctrl-c"],
)
def test_runner_stops_the_server_when_interrupted(tmp_path, sig, to_group):
    runner, report = start_runner(tmp_path, sleep=120, code=0)
    seen = wait_report(runner, report)
    check_server(seen)
    (os.killpg if to_group else os.kill)(runner.pid, sig)
    assert runner.wait(timeout=60) == 128 + sig  # the command died of the signal
    assert wait_gone([seen["pid"], *seen["servers"]], 1) == []
    assert not Path(seen["homes"][0]).exists()


@pytest.mark.slow
def test_runner_stops_a_server_still_starting_when_terminated(tmp_path):
    runner, report = start_runner(tmp_path, sleep=0, code=0)
    deadline = time.monotonic() + STARTUP
    while not (servers := [pid for pid in descendants(runner.pid) if port_arg(pid)]):
        assert runner.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(runner.pid, signal.SIGTERM)
    assert runner.wait(timeout=60) == 128 + signal.SIGTERM
    assert not report.exists()  # the command never ran
    assert wait_gone(servers, 1) == []


@pytest.mark.slow
def test_sigkill_of_the_runner_takes_the_server_down(tmp_path):
    runner, report = start_runner(tmp_path, sleep=120, code=0)
    seen = wait_report(runner, report)
    check_server(seen)
    runner.kill()
    runner.wait()
    try:
        assert wait_gone(seen["servers"], 5) == []
    finally:
        os.kill(seen["pid"], signal.SIGKILL)  # the command itself cannot be told
        shutil.rmtree(seen["homes"][0], ignore_errors=True)  # nor could the runner clean up


def tiny_stage(tmp_path: Path) -> list[str]:
    """``fcn-pipeline ingest`` of a 12-image synthetic set, run in ``tmp_path``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["synthetic"]["splits"] = {"train": 8, "val": 2, "test": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return ["fcn-pipeline", "ingest", "--out", "ingested", "--workers", "1"]


@pytest.mark.slow
def test_a_stage_run_alone_sends_its_logs_before_stopping_its_server(tmp_path):
    log = tmp_path / "stage.log"
    with open(log, "w") as out:
        stage = subprocess.Popen(tiny_stage(tmp_path), cwd=tmp_path, env=child_env(),
                                 stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        servers: list[int] = []
        while stage.poll() is None:  # note its server while it runs
            below = descendants(stage.pid)
            servers += [pid for pid in below if port_arg(pid) and pid not in servers]
            time.sleep(0.2)
    stderr = log.read_text()
    assert stage.returncode == 0, stderr
    assert (tmp_path / "ingested" / "dataset.json").is_file()
    assert "Finished in state Completed" in stderr
    assert "Error logging to API" not in stderr  # logs sent while the server was up
    assert len(servers) == 1
    assert wait_gone(servers, 1) == []


@pytest.mark.slow
def test_kill_9_of_a_stage_leaves_no_prefect_server(tmp_path):
    command = tiny_stage(tmp_path)
    stage = subprocess.Popen(command, cwd=tmp_path, env=child_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP
        servers: list[int] = []
        while not servers:  # a process under the stage whose port answers /api/health
            assert stage.poll() is None, "the stage ended before its server answered"
            assert time.monotonic() < deadline, "no Prefect server under the stage"
            servers = [pid for pid in descendants(stage.pid) if healthy(port_arg(pid))]
            time.sleep(0.2)
        os.kill(stage.pid, signal.SIGKILL)
        stage.wait()
        assert wait_gone(servers, 5) == []
    finally:
        if stage.poll() is None:
            stage.kill()
