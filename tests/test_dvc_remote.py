"""A local DVC remote: `dvc push` saves the outputs, `dvc pull` restores them bit for bit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import project_env

pytestmark = pytest.mark.slow


def dvc(project: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["dvc", *args], cwd=project, env=env, capture_output=True, text=True, timeout=600
    )


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_pull_from_a_local_remote_restores_outputs_bit_for_bit(project_copy, tmp_path):
    env = project_env()
    params = yaml.safe_load((project_copy / "params.yaml").read_text())
    params["data"]["synthetic"].update(
        height=48, width=64, splits={"train": 4, "val": 2, "test": 2}
    )
    params["data"]["workers"] = 1
    (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run = dvc(project_copy, "repro", "ingest", env=env)
    assert run.returncode == 0, run.stdout + run.stderr

    remote = tmp_path / "dvc-remote"
    added = dvc(project_copy, "remote", "add", "-d", "local", str(remote), env=env)
    assert added.returncode == 0, added.stderr
    pushed = dvc(project_copy, "push", env=env)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert any(p.is_file() for p in remote.rglob("*"))

    out = project_copy / params["data"]["out"]
    before = files_under(out)
    assert "dataset.json" in before
    shutil.rmtree(out)
    shutil.rmtree(project_copy / ".dvc" / "cache")

    pulled = dvc(project_copy, "pull", "ingest", env=env)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert files_under(out) == before
    status = dvc(project_copy, "status", "ingest", env=env)
    assert "up to date" in status.stdout, status.stdout
