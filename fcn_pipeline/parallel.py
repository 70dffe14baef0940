"""Run one function over many shards in worker processes, results in order.

Every stage that touches shards (ingest, stats, patches) parallelises the same
way: one task per shard, memory bounded by one shard per worker, results
consumed in shard order so merges are deterministic. The stages take the
mapping as an argument (a :data:`ShardMapper`, :func:`map_shards` by default),
so a caller can run the same shard calls elsewhere (the flows run them on a
Dask cluster) without the library knowing about it.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

# ``mapper(function, calls, workers)`` yields ``function(*args)`` for each
# ``args`` in ``calls``, in order; :func:`map_shards` is the default.
ShardMapper = Callable[[Callable[..., Any], Sequence[tuple[Any, ...]], int], Iterator[Any]]


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """Pool initializer: have the kernel SIGKILL this worker when the process that
    started it (pid ``parent``) dies, however it dies (``kill -9``, the OOM killer), so
    no worker outlives its stage. Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def process_count(workers: int) -> int:
    """``0`` means every core this process may use."""
    return workers or len(os.sched_getaffinity(0))


def map_shards(
    function: Callable[..., T], calls: Sequence[tuple[Any, ...]], workers: int
) -> Iterator[T]:
    """Yield ``function(*args)`` for each ``args`` in ``calls``, in order.

    ``workers`` processes share the calls (0 = all cores): this one and a pool
    of ``workers - 1`` spawned ones. The pool takes calls from the front; while
    this process waits for the next result it takes calls from the back that no
    worker has started yet. So no core idles while the workers start up (a
    spawned worker spends a good part of a second importing numpy, PIL and
    pyarrow), and with one worker or one call everything runs here. Processes
    are spawned, not forked: the caller may be a threaded process (Prefect,
    torch), and a fork would copy its held locks. If the consumer stops early or
    raises, pending calls are cancelled; if this process is killed, the kernel kills
    the workers (:func:`die_with_parent`).
    """
    workers = min(process_count(workers), max(1, len(calls)))
    if workers == 1:
        yield from (function(*args) for args in calls)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers - 1, mp_context=context, initializer=die_with_parent, initargs=(os.getpid(),)
    ) as pool:
        try:
            futures = [pool.submit(function, *args) for args in calls]
            done_here: dict[int, T] = {}
            back = len(calls) - 1
            for i, future in enumerate(futures):
                # Future.cancel() succeeds only for a call no worker has taken.
                while not future.done() and back > i and futures[back].cancel():
                    done_here[back] = function(*calls[back])
                    back -= 1
                yield done_here.pop(i) if i in done_here else future.result()
        finally:
            pool.shutdown(cancel_futures=True)
