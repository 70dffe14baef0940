"""map_shards: results in call order, work shared between this process and the pool."""

import os
import subprocess
import sys
import time

import pytest

from fcn_pipeline.parallel import map_shards


def slow_square(i: int) -> tuple[int, int]:
    time.sleep(0.05)
    return i * i, os.getpid()


def fail_on(i: int, bad: int) -> int:
    if i == bad:
        raise ValueError(f"call {i} failed")
    return i


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_come_in_call_order(workers):
    results = list(map_shards(slow_square, [(i,) for i in range(12)], workers))
    assert [square for square, _ in results] == [i * i for i in range(12)]


def test_this_process_and_a_worker_share_the_calls():
    pids = [pid for _, pid in map_shards(slow_square, [(i,) for i in range(12)], 2)]
    # The pool takes calls from the front, this process from the back while it waits.
    assert pids[0] != os.getpid()
    assert pids[-1] == os.getpid()
    assert len(set(pids)) == 2


def test_one_worker_runs_everything_here():
    pids = {pid for _, pid in map_shards(slow_square, [(i,) for i in range(3)], 1)}
    assert pids == {os.getpid()}


@pytest.mark.parametrize("bad", [0, 7])  # 0 runs in a worker, 7 (the last) here
def test_a_failing_call_raises_in_the_caller(bad):
    with pytest.raises(ValueError, match=f"call {bad} failed"):
        list(map_shards(fail_on, [(i, bad) for i in range(8)], 2))


def test_modules_that_workers_import_stay_light():
    # Spawned workers import the module of the function they run and the console
    # script's module (flows.cli); pydantic and torch would add seconds to start-up.
    modules = "fcn_pipeline.ingest, fcn_pipeline.sources.camvid, fcn_pipeline.stats, "
    modules += "fcn_pipeline.patches, flows.cli"
    code = f"import sys, {modules}; print(sorted({{'pydantic', 'torch'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _children(pid: int) -> set[int]:
    """The live children of ``pid`` (all its threads'), read from /proc."""
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found |= {int(child) for child in f.read().split()}
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_the_parent_takes_its_pool_workers_with_it(tmp_path):
    """What the OOM killer does to a data stage: no worker (nor multiprocessing's resource
    tracker) may stay behind with parent 1."""
    started = tmp_path / "started"
    started.mkdir()
    script = (
        "import os, sys, time\n"
        "from fcn_pipeline.parallel import map_shards\n"
        "from tests.test_parallel import mark_and_sleep\n"
        f"list(map_shards(mark_and_sleep, [({str(started)!r}, i) for i in range(4)], 2))\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        deadline = time.monotonic() + 60
        while len(os.listdir(started)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(os.listdir(started)) >= 2, "the pool never started"
        children = _children(parent.pid)
        workers = {int(name) for name in os.listdir(started)} - {parent.pid}
        assert workers and workers <= children
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)], "orphans left"
    finally:
        parent.kill()


def mark_and_sleep(folder: str, i: int) -> int:
    open(os.path.join(folder, str(os.getpid())), "w").close()
    time.sleep(120)
    return i
