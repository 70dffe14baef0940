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
