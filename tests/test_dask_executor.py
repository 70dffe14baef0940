"""``executor.kind: dask``: the data stages on a Dask cluster give the process pool's bytes."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from fcn_pipeline.config import (
    DataParams,
    ExecutorParams,
    PatchesParams,
    StatsParams,
    SyntheticParams,
    load_params,
    parse_params,
)
from fcn_pipeline.errors import ConfigError, DatasetError
from fcn_pipeline.ingest import ingest
from fcn_pipeline.parallel import map_shards, process_count
from fcn_pipeline.patches import extract_patches
from fcn_pipeline.stats import count_classes
from fcn_pipeline.store import iter_shard, read_dataset_meta, shard_paths, write_shard
from flows.executor import cluster_options, shard_mapper
from tests.conftest import compute_stats, project_env

REPO = Path(__file__).resolve().parents[1]
# 24 images in shards of 4: 6 ingest shards (4 of them train), so every stage has
# several shard tasks; patches go into shards of 8, several per source shard.
TINY = SyntheticParams(height=48, width=64, splits={"train": 16, "val": 4, "test": 4})
SHARD_SIZE = 4


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def stage_overrides(base: Path, executor: dict[str, Any]) -> dict[str, Any]:
    """Overrides for ingest, stats and patches of TINY under ``base`` (2 workers each)."""
    data, stats, patches = base / "ingested", base / "stats", base / "patches"
    overrides = {
        "data.out": str(data),
        "data.shard_size": SHARD_SIZE,
        "data.synthetic": TINY.model_dump(mode="json"),
        "stats.out": str(stats),  # what patches reads too
        "patches.out": str(patches),
        "patches.patches_per_image": 4,
        "patches.shard_size": 8,
    }
    for stage in ("data", "stats", "patches"):
        overrides[f"{stage}.workers"] = 2
    overrides.update({f"executor.{key}": value for key, value in executor.items()})
    return overrides


# --- parameters and wiring (no cluster) ---------------------------------------------


def test_repository_params_keep_the_process_pool():
    executor = load_params(REPO / "params.yaml").executor
    assert executor == ExecutorParams()
    assert (executor.kind, executor.address, executor.workers) == ("processes", None, 0)
    assert shard_mapper(executor) is map_shards
    assert shard_mapper(ExecutorParams(kind="dask")) is not map_shards


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"executor.kind": "threads"}, "executor.kind"),
        ({"executor.address": "tcp://10.0.0.5 :8786"}, "executor.address"),
        ({"executor.address": ""}, "executor.address"),
        ({"executor.workers": -1}, "executor.workers"),
        ({"executor.cluster": "local"}, "executor.cluster"),
    ],
)
def test_bad_executor_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"  {re.escape(key)}"):
        parse_params({}, source="params.yaml", overrides=overrides)


def test_cluster_options_connect_or_start_a_local_cluster():
    api = "http://127.0.0.1:4200/api"
    remote = ExecutorParams(kind="dask", address="tcp://10.0.0.5:8786", workers=7)
    assert cluster_options(remote, api) == {"address": "tcp://10.0.0.5:8786"}
    local = cluster_options(ExecutorParams(kind="dask", workers=2), api)["cluster_kwargs"]
    assert (local["n_workers"], local["threads_per_worker"], local["processes"]) == (2, 1, True)
    assert local["env"]["PREFECT_API_URL"] == api and local["host"] == "127.0.0.1"
    all_cores = cluster_options(ExecutorParams(kind="dask"), api)["cluster_kwargs"]
    assert all_cores["n_workers"] == process_count(0)


def test_stages_run_their_shards_through_the_given_mapper(tmp_path):
    """A mapper that runs the calls last to first still gives identical outputs."""
    names: list[str] = []

    def backwards(function: Callable[..., Any], calls: Sequence[tuple], workers: int) -> Iterator:
        names.append(function.__name__)
        results = [function(*args) for args in reversed(calls)]
        yield from reversed(results)

    outputs = {}
    for label, mapper in (("pool", map_shards), ("backwards", backwards)):
        base = tmp_path / "run"
        data = ingest(
            DataParams(shard_size=SHARD_SIZE, synthetic=TINY, workers=1),
            base / "ingested",
            mapper=mapper,
        ).out
        stats = compute_stats(
            StatsParams(data=str(data), workers=1), base / "stats", mapper=mapper
        ).out
        patches = PatchesParams(data=str(data), stats=str(stats), shard_size=8, workers=1)
        extract_patches(patches, base / "patches", mapper=mapper)
        outputs[label] = tree_bytes(base)
        base.rename(tmp_path / label)
    assert names == ["ingest_shard", "count_shard", "extract_shard"]
    assert outputs["pool"] == outputs["backwards"]
    assert sum(name.endswith(".parquet") for name in outputs["pool"]) > 10


# --- on a 2-worker LocalCluster --------------------------------------------------------


def shard_task_runs(flow_run_id: Any) -> list[tuple[str, str]]:
    """(name, state) of every task run of a flow run, as the run's Prefect API has them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return sorted((run.name, run.state_type.value) for run in runs)


@pytest.mark.slow
def test_dask_stages_are_byte_identical_to_the_process_pool(tmp_path, prefect_api_url):
    from flows.stage_runs import run_as_flow
    from flows.stages import stage_module, stage_params

    params_file = str(REPO / "params.yaml")
    base = tmp_path / "run"
    outputs, task_runs = {}, {}
    for kind in ("processes", "dask"):
        overrides = stage_overrides(base, {"kind": kind, "workers": 2})
        for stage in ("ingest", "stats", "patches"):
            params = stage_params(params_file, overrides, stage_module(stage).PARAMS)
            shown = {"params_file": params_file, "overrides": overrides}
            state = run_as_flow(stage, None, params, None, shown, return_state=True)
            assert state.is_completed(), state
            task_runs[kind, stage] = shard_task_runs(state.state_details.flow_run_id)
        outputs[kind] = tree_bytes(base)
        base.rename(tmp_path / kind)  # same paths for both runs: patches.json records them

    assert outputs["dask"].keys() == outputs["processes"].keys()
    for name, content in outputs["processes"].items():
        assert outputs["dask"][name] == content, name
    assert {"ingested/dataset.json", "stats/stats.json", "stats/class_frequency.png"} <= set(
        outputs["dask"]
    )
    assert sum(name.startswith("patches/train/") for name in outputs["dask"]) > 4
    # One task per shard, recorded as completed by the run's own API (a worker
    # reporting to a temporary API of its own would leave them out).
    shards = {"ingest": ("ingest_shard", 6), "stats": ("count_shard", 6)}
    shards["patches"] = ("extract_shard", 4)
    for stage, (function, count) in shards.items():
        runs = [run for run in task_runs["dask", stage] if run[0].startswith(f"{function}-")]
        assert runs == [(f"{function}-{i:05d}", "COMPLETED") for i in range(count)], stage
        assert not any(run[0].startswith(function) for run in task_runs["processes", stage])


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[str]:
    """A 2-worker LocalCluster started by the test, for ``executor.address``."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


@pytest.mark.slow
def test_an_existing_scheduler_runs_the_shards_and_reports_their_errors(
    tmp_path, prefect_api_url, local_cluster, monkeypatch
):
    from prefect import flow

    @flow(name="count-on-dask")
    def count_on_dask(data: str, address: str) -> dict[str, int]:
        mapper = shard_mapper(ExecutorParams(kind="dask", address=address))
        counts = count_classes(data, mapper=mapper)
        return {split: c.labelled_pixels for split, c in counts.splits.items()}

    data = ingest(DataParams(shard_size=SHARD_SIZE, synthetic=TINY, workers=1), tmp_path / "d").out
    expected = {s: c.labelled_pixels for s, c in count_classes(data, 1).splits.items()}
    assert count_on_dask(str(data), local_cluster) == expected

    # A mask value that is no class: the worker's DatasetError reaches the caller as is.
    shard = shard_paths(data, "val", read_dataset_meta(data))[0]
    rows = list(iter_shard(shard))
    rows[0]["mask"] = _mask_with_value(rows[0]["mask"], 200)
    write_shard(shard, rows)
    with pytest.raises(DatasetError, match=rf"{shard.name}: mask of .* outside 0\.\.5"):
        count_on_dask(str(data), local_cluster)

    # Workers in another directory would resolve the stages' relative paths elsewhere.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="Dask workers must run in the project directory"):
        count_on_dask(str(data), local_cluster)


def _mask_with_value(png: bytes, value: int) -> bytes:
    from fcn_pipeline.store import decode_mask, encode_png

    mask = decode_mask(png).copy()
    mask[0, 0] = value
    return encode_png(mask)


@pytest.mark.slow
def test_cli_without_a_prefect_server_runs_one_temporary_api(tmp_path):
    """Without PREFECT_API_URL a stage on Dask runs as a flow run on Prefect's own
    temporary server, and the Dask workers report to that one: none starts another."""
    data = ingest(DataParams(shard_size=SHARD_SIZE, synthetic=TINY, workers=1), tmp_path / "d").out
    expected = compute_stats(StatsParams(data=str(data), workers=1), tmp_path / "expected").out
    params_file = tmp_path / "params.yaml"
    groups = {"data": {"out": str(data)}, "stats": {"out": str(tmp_path / "stats")}}
    params_file.write_text(yaml.safe_dump({**groups, "executor": {"kind": "dask", "workers": 2}}))
    env = project_env()
    env["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "true"  # the Dask path's own server
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # its own database
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"  # a loaded CI machine
    run = subprocess.run(
        ["fcn-pipeline", "--params", str(params_file), "stats"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("Starting temporary server") == 1, run.stderr[-3000:]
    assert "count_shard-00005" in run.stderr
    assert tree_bytes(tmp_path / "stats") == tree_bytes(expected)
