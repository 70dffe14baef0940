"""Run one function over many shards in worker processes, results in order.

Every stage that touches shards (ingest, stats, patches) parallelises the same
way: one task per shard, memory bounded by one shard per worker, results
consumed in shard order so merges are deterministic.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def resolve_workers(workers: int) -> int:
    """``0`` means every core this process may use."""
    return workers or len(os.sched_getaffinity(0))


def map_shards(
    function: Callable[..., T], calls: Sequence[tuple[Any, ...]], workers: int
) -> Iterator[T]:
    """Yield ``function(*args)`` for each ``args`` in ``calls``, in order.

    With one worker (or one call) everything runs in this process; otherwise in
    a pool of ``workers`` processes (0 = all cores). Processes are spawned, not
    forked: the caller may be a threaded process (Prefect, torch), and a fork
    would copy its held locks. If the consumer stops early or raises, pending
    calls are cancelled.
    """
    workers = min(resolve_workers(workers), max(1, len(calls)))
    if workers == 1:
        yield from (function(*args) for args in calls)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        try:
            yield from pool.map(function, *zip(*calls, strict=True))
        finally:
            pool.shutdown(cancel_futures=True)
