"""Ingest and stats on a 2-worker Dask LocalCluster next to the local process pool.

Usage::

    .venv/bin/python benchmarks/bench_dask.py [--camvid ROOT | --synthetic] [--workers 2]

Same data, same worker count (``--workers`` processes in the pool, as many
single-threaded Dask workers), same shards. Per stage:

- ``processes``: the stage as ``executor.kind: processes`` runs it (the pool's
  start-up included), best of ``--repeats``;
- ``dask, warm``: one Prefect task per shard through ``DaskTaskRunner`` on a
  LocalCluster started beforehand whose workers have already run a stage (the
  cost a long-lived cluster adds per stage: client, tasks, Prefect API calls),
  best of ``--repeats``;
- ``dask, own cluster``: the stage as ``executor.kind: dask`` with
  ``address: null`` runs it, starting and closing its own LocalCluster (once).

The cluster's start-up (scheduler and worker processes ready) and the first
stage on fresh workers (their imports) are reported apart. Every Dask output
is checked byte for byte against the pool's. Runs inside one Prefect flow, on
``PREFECT_API_URL`` if set, else on a temporary API (its start is not timed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "datasets" / "camvid"


def timed(function: Callable[[], Any]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def stage_runners(data_params: Any, tmp: Path) -> dict[str, Callable[[Any, str], Path]]:
    """``run(mapper, label) -> output dir`` for ingest and stats (stats reads the pool's ingest)."""
    from fcn_pipeline.ingest import ingest
    from fcn_pipeline.stats import count_classes, write_stats

    ingested = tmp / "processes-ingest"

    def run_ingest(mapper: Any, label: str) -> Path:
        return ingest(data_params, tmp / f"{label}-ingest", mapper=mapper).out

    def run_stats(mapper: Any, label: str) -> Path:
        counts = count_classes(ingested, data_params.workers, mapper=mapper)
        return write_stats(counts, tmp / f"{label}-stats").out

    return {"ingest": run_ingest, "stats": run_stats}


def bench(data_params: Any, workers: int, repeats: int, tmp: Path) -> dict[str, dict[str, float]]:
    """Seconds per stage and way of running it (see the module docstring)."""
    from distributed import LocalCluster

    from fcn_pipeline.config import ExecutorParams
    from fcn_pipeline.parallel import map_shards
    from flows.executor import quiet_distributed, shard_mapper

    runners = stage_runners(data_params, tmp)
    seconds: dict[str, dict[str, float]] = {stage: {} for stage in runners}
    for stage, run in runners.items():
        seconds[stage]["processes"] = min(
            timed(lambda run=run: run(map_shards, "processes")) for _ in range(repeats)
        )
    with quiet_distributed():
        start = time.perf_counter()
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None, env={"DASK_LOGGING__DISTRIBUTED": "warning"},
        )  # fmt: skip
        seconds["cluster"] = {"start": time.perf_counter() - start}
    with cluster:
        warm = shard_mapper(ExecutorParams(kind="dask", address=cluster.scheduler_address))
        for stage, run in runners.items():
            runs = [timed(lambda run=run: run(warm, "dask")) for _ in range(repeats + 1)]
            seconds[stage]["dask, first"], seconds[stage]["dask, warm"] = runs[0], min(runs[1:])
            check_identical(tmp, stage, "dask")
    own = shard_mapper(ExecutorParams(kind="dask", workers=workers))
    for stage, run in runners.items():
        seconds[stage]["dask, own cluster"] = timed(lambda run=run: run(own, "own"))
        check_identical(tmp, stage, "own")
    return seconds


def check_identical(tmp: Path, stage: str, label: str) -> None:
    if tree_bytes(tmp / f"{label}-{stage}") != tree_bytes(tmp / f"processes-{stage}"):
        raise SystemExit(f"{stage}: the Dask output differs from the process pool's")


def report(seconds: dict[str, dict[str, float]], images: int, shards: int, workers: int) -> None:
    print(f"cluster start-up ({workers} workers ready): {seconds['cluster']['start']:.2f} s")
    print(f"{'stage':8} {'way':26} {'s':>7} {'images/s':>9} {'x pool':>7}")
    for stage in ("ingest", "stats"):
        pool = seconds[stage]["processes"]
        for way, value in seconds[stage].items():
            note = "  (fresh workers: imports)" if way == "dask, first" else ""
            print(
                f"{stage:8} {way:26} {value:7.2f} {images / value:9.1f} {value / pool:7.2f}{note}"
            )
    for stage in ("ingest", "stats"):
        ratio = seconds[stage]["dask, warm"] / seconds[stage]["processes"]
        extra = (seconds[stage]["dask, warm"] - seconds[stage]["processes"]) / shards
        print(
            f"{stage}: warm {workers}-worker LocalCluster / process pool = {ratio:.2f}x "
            f"({extra:+.3f} s wall per shard)"
        )


def main(argv: list[str] | None = None) -> int:
    from prefect import flow

    from fcn_pipeline.config import DataParams, SyntheticParams
    from fcn_pipeline.store import read_dataset_meta

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--camvid", type=Path, default=CAMVID, help="CamVid (SegNet layout) root")
    source.add_argument("--synthetic", action="store_true", help="the default synthetic set")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if args.synthetic:
        data_params = DataParams(
            shard_size=args.shard_size, workers=args.workers, synthetic=SyntheticParams()
        )
    else:
        data_params = DataParams(
            format="camvid", root=str(args.camvid), shard_size=args.shard_size,
            workers=args.workers,
        )  # fmt: skip

    @flow(name="bench-dask")
    def bench_flow(workdir: str) -> dict[str, dict[str, float]]:
        return bench(data_params, args.workers, args.repeats, Path(workdir))

    with tempfile.TemporaryDirectory() as tmp:
        seconds = bench_flow(tmp)
        meta = read_dataset_meta(Path(tmp) / "processes-ingest")
    images = sum(meta.split_images(s) for s in meta.splits)
    shards = sum(len(meta.splits[s]) for s in meta.splits)
    source_name = "synthetic" if args.synthetic else str(args.camvid)
    print(f"data: {source_name}, {images} images in {shards} shards of {args.shard_size}")
    report(seconds, images, shards, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
