"""Real `dvc repro` runs of the pipeline in a temporary copy of the project."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.conftest import project_env

pytestmark = pytest.mark.slow


def dvc(project, *args, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["dvc", *args], cwd=project, env=env, capture_output=True, text=True, timeout=900
    )


def test_dvc_repro_ingest_then_up_to_date(project_copy, prefect_api_url):
    env = project_env(prefect_api_url)
    params = yaml.safe_load((project_copy / "params.yaml").read_text())
    params["data"]["synthetic"]["splits"] = {"train": 8, "val": 2, "test": 2}
    (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    run = dvc(project_copy, "repro", "ingest", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    meta = json.loads((project_copy / "data" / "ingested" / "dataset.json").read_text())
    assert {s: v["images"] for s, v in meta["splits"].items()} == {"train": 8, "val": 2, "test": 2}
    lock = yaml.safe_load((project_copy / "dvc.lock").read_text())
    assert lock["stages"]["ingest"]["outs"][0]["path"] == "data/ingested"

    status = dvc(project_copy, "status", "ingest", env=env)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout

    # A parameter change makes the stage stale again.
    params["data"]["synthetic"]["seed"] = 5
    (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = dvc(project_copy, "status", "ingest", env=env)
    assert "params.yaml" in stale.stdout and "modified:" in stale.stdout, stale.stdout
