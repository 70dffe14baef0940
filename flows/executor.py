"""Where the data stages run their shard calls: the local process pool or a Dask cluster.

``executor.kind: processes`` (the default) keeps the library's own mapper,
:func:`fcn_pipeline.parallel.map_shards` (:func:`flows.stages.shard_mapper` picks);
``executor.kind: dask`` runs one Prefect task per shard call through
``prefect_dask.DaskTaskRunner``, on the scheduler at ``executor.address`` or on a
LocalCluster of ``executor.workers`` single-threaded worker processes started for
the stage (and closed after it).

The library merges the results in shard order whichever mapper runs them, so
the outputs are byte-identical. Two things the Dask side must get right:

- A shard task does its work in the Dask worker itself: a worker process is
  daemonic and may not start a process pool of its own.
- Every worker must report to the Prefect API of this run. A stage on Dask runs
  as a flow run even under a plain ``dvc repro`` (:func:`flows.stages.needs_flow_run`);
  with no Prefect server configured its API is Prefect's own temporary one, and a
  worker left alone would start another and record the shard tasks there. So the
  tasks are submitted with this run's API URL in their serialised settings, and a
  LocalCluster's workers also get it in their environment.

Prefect is imported only on the Dask path: a stage on local processes runs without it.

Shard calls carry paths relative to the project directory, so every worker
must run in the same directory (on other hosts: the same path on a shared
file system); that is checked before any shard is submitted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

from fcn_pipeline.config import ExecutorParams
from fcn_pipeline.errors import ConfigError
from fcn_pipeline.parallel import ShardMapper, map_shards, process_count


def shard_mapper(executor: ExecutorParams) -> ShardMapper:
    """The mapper the data stages pass to the library for ``executor``."""
    if executor.kind == "dask":
        return partial(map_shards_on_dask, executor)
    return map_shards


def run_shard(function: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """``function(*args)`` for one shard, in the Dask worker itself (a Prefect task)."""
    return function(*args)


def run_api_url() -> str:
    """The URL of the Prefect API this flow run reports to (a temporary one included)."""
    from prefect.client.orchestration import get_client

    return str(get_client(sync_client=True).api_url).rstrip("/")


def cluster_options(executor: ExecutorParams, api_url: str) -> dict[str, Any]:
    """``DaskTaskRunner`` arguments: the scheduler's address, or a LocalCluster to start."""
    if executor.address:
        return {"address": executor.address}
    return {
        "cluster_kwargs": {
            "n_workers": process_count(executor.workers),
            # One single-threaded process per worker: the shard work holds the GIL.
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:0",  # served only if bokeh is installed
            "env": {"PREFECT_API_URL": api_url, "DASK_LOGGING__DISTRIBUTED": "warning"},
        }
    }


@contextmanager
def quiet_distributed() -> Iterator[None]:
    """Keep the scheduler's and nannies' start/stop chatter (INFO) out of the stage log."""
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def check_worker_directories(client: Any, address: str) -> None:
    """Raise :class:`ConfigError` unless every worker runs in this process's directory."""
    if not client.scheduler_info().get("workers"):
        raise ConfigError(f"executor.address: the Dask scheduler at {address} has no workers")
    here = os.path.realpath(os.getcwd())
    elsewhere = {
        worker: cwd
        for worker, cwd in client.run(lambda: os.path.realpath(os.getcwd())).items()
        if cwd != here
    }
    if elsewhere:
        listed = ", ".join(f"{worker} in {cwd}" for worker, cwd in sorted(elsewhere.items()))
        raise ConfigError(
            f"executor: Dask workers must run in the project directory {here} (shard paths "
            f"are relative to it); found {listed}. Start `dask worker` from that directory."
        )


def map_shards_on_dask(
    executor: ExecutorParams,
    function: Callable[..., Any],
    calls: Sequence[tuple[Any, ...]],
    workers: int,
) -> Iterator[Any]:
    """Yield ``function(*args)`` for each ``args`` in ``calls``, in order, one Prefect task
    per call on Dask. ``workers`` (the stage's process count) is unused: the cluster's
    size is ``executor.workers`` or whatever runs at ``executor.address``. Must run
    inside a Prefect flow run.
    """
    from prefect import get_run_logger, task
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_dask import DaskTaskRunner  # imports distributed: only when asked for

    from flows.common import TASK_DEFAULTS

    del workers
    logger = get_run_logger()
    api_url = run_api_url()
    name = function.__name__
    with quiet_distributed(), DaskTaskRunner(**cluster_options(executor, api_url)) as runner:
        client = runner.client  # connects, or starts the LocalCluster
        where = executor.address or client.scheduler.address
        check_worker_directories(client, where)
        logger.info(
            "running %d %s tasks on the Dask cluster at %s (%d workers)",
            len(calls),
            name,
            where,
            len(client.scheduler_info()["workers"]),
        )
        shard = task(run_shard, name=name, **TASK_DEFAULTS)
        # serialize_context() puts the current settings into every submitted task:
        # with this run's API URL in them, workers report here.
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            futures = [
                runner.submit(
                    shard.with_options(task_run_name=f"{name}-{i:05d}"),
                    {"function": function, "args": args},
                )
                for i, args in enumerate(calls)
            ]
        for future in futures:
            yield future.result()
