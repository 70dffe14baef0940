"""Stages are plain programs, and children of the Prefect run that started DVC.

Without a parent a stage command imports no Prefect at all; with a parent flow run's id
in ``FCN_PREFECT_PARENT`` (what the pipeline and study flows pass to DVC) each stage
is a flow run linked to that parent through a placeholder task run, so the server lists
it among the parent's subflow runs, with its state, its logs and its artifacts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import project_env, tiny_params_file


def test_a_stage_without_a_parent_imports_no_prefect(tmp_path):
    """The plain path: the stage runs, and `prefect` is never imported (so no server,
    no API call, no link), with Prefect's temporary server forbidden besides."""
    (tmp_path / "params.yaml").write_text(
        "data:\n  out: ingested\n  workers: 1\n  synthetic: {height: 48, width: 64, "
        "splits: {train: 2, val: 1, test: 1}}\n"
    )
    probe = (
        "import sys; from flows.cli import main; status = main(['ingest']); "
        "print('prefect imported' if 'prefect' in sys.modules else 'no prefect'); "
        "sys.exit(status)"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=project_env(),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "no prefect"
    assert "ingested 4 images" in run.stderr and "View at" not in run.stderr
    assert (tmp_path / "ingested" / "dataset.json").is_file()


def test_a_parent_that_is_not_a_run_id_is_refused(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  out: ingested\n")
    env = {**project_env(), "FCN_PREFECT_PARENT": "not-a-uuid"}
    run = subprocess.run(
        ["fcn-pipeline", "ingest"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.strip() == (
        "fcn-pipeline ingest: error: FCN_PREFECT_PARENT='not-a-uuid': not a Prefect flow run id"
    )
    assert not (tmp_path / "ingested").exists()


# --- under a parent flow run ----------------------------------------------------------


def run_under_parent(cwd: Path, api_url: str, commands: list[list[str]]) -> tuple[str, list]:
    """Run each ``fcn-pipeline`` command as the pipeline flow runs DVC: in a subprocess,
    from inside a flow run, with :func:`flows.stage_runs.parent_env`. Returns the parent
    flow run's id and each command's completed process."""
    from prefect import flow

    from flows.stage_runs import parent_env

    @flow(name="parent-of-stages")
    def parent() -> list[tuple[int, str]]:
        env = {**project_env(api_url), **parent_env()}
        run = ["fcn-pipeline"]
        options = {"cwd": cwd, "env": env, "capture_output": True, "text": True, "timeout": 600}
        return [subprocess.run([*run, *command], **options) for command in commands]

    state = parent(return_state=True)
    return str(state.state_details.flow_run_id), state.result()


def children(parent_id: str) -> dict[str, Any]:
    """The parent's subflow runs as the server lists them (the UI's query), by name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])
            )
        )
    return {run.name: run for run in runs}


def artifacts_of(flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in found}


def placeholders(parent_id: str) -> dict[str, Any]:
    """The parent's task runs that stand for its child flow runs, by name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parent_id]))
        )
    return {run.name: run for run in runs}


@pytest.mark.slow
def test_stages_under_a_parent_are_its_subflow_runs_with_artifacts(
    tiny_data, tmp_path, prefect_api_url
):
    params_file = tiny_params_file(tiny_data, tmp_path, ingest_to=tmp_path / "ingested")
    base = ["--params", str(params_file)]
    parent_id, runs = run_under_parent(
        tmp_path, prefect_api_url,
        [[*base, "ingest"], [*base, "train", "--variant", "fcn32s"],
         [*base, "evaluate", "--variant", "fcn32s"]],
    )  # fmt: skip
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    found = children(parent_id)
    assert set(found) == {"ingest", "train@fcn32s", "evaluate@fcn32s"}
    assert all(run.state.is_completed() for run in found.values())
    tracking = placeholders(parent_id)
    for name, child in found.items():  # the parent's task run that stands for each child
        assert tracking[name].state.is_completed()
        assert child.parent_task_run_id == tracking[name].id

    ingest = artifacts_of(found["ingest"].id)
    assert "ingest-splits" in ingest and '"images": 4' in str(ingest["ingest-splits"].data)
    train = artifacts_of(found["train@fcn32s"].id)
    assert train["train-fcn32s"].type == "progress" and train["train-fcn32s"].data == 100.0
    curve = train["train-fcn32s-curve"]
    assert curve.type == "table" and str(curve.data).count('"epoch"') == 2
    assert train["train-fcn32s-model"].type == "markdown"  # a link artifact's kind
    assert (tmp_path / "models" / "fcn32s" / "model.pt").as_uri() in train[
        "train-fcn32s-model"
    ].data
    scores = artifacts_of(found["evaluate@fcn32s"].id)
    metrics = yaml.safe_load((tmp_path / "metrics" / "fcn32s.json").read_text())
    assert f'"value": {round(metrics["mean_iu"], 4)}' in str(scores["fcn32s-metrics"].data)
    assert str(scores["fcn32s-per-class-iu"].data).count('"class"') == len(metrics["per_class_iu"])
    assert "confusion.csv" in scores["fcn32s-confusion"].data
    # The DVCLive curves are the plain stage's: the report adds, it does not replace.
    assert (tmp_path / "dvclive" / "fcn32s" / "metrics.json").is_file()


@pytest.mark.slow
def test_a_failed_stage_is_a_failed_child_with_its_traceback_and_one_line_here(
    tmp_path, prefect_api_url
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    (tmp_path / "params.yaml").write_text(
        f"data:\n  format: camvid\n  root: {tmp_path / 'absent'}\n  out: ingested\n"
    )
    parent_id, [run] = run_under_parent(tmp_path, prefect_api_url, [["ingest"]])
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("fcn-pipeline ingest: error: ")
    assert str(tmp_path / "absent") in errors[0]
    assert "Traceback" not in run.stderr
    child = children(parent_id)["ingest"]
    assert child.state.is_failed()
    assert placeholders(parent_id)["ingest"].state.is_failed()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[child.id]))
        )
    assert any("Traceback (most recent call last)" in log.message for log in logs)
