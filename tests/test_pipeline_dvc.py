"""Real `dvc repro` runs of the pipeline in a temporary copy of the project."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.conftest import project_env, tiny_project

pytestmark = pytest.mark.slow


def dvc(project, *args, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["dvc", *args], cwd=project, env=env, capture_output=True, text=True, timeout=900
    )


def test_dvc_repro_ingest_then_up_to_date(project_copy):
    env = project_env()
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


def test_dvc_repro_whole_pipeline_then_metrics_and_plots(project_copy):
    """ingest -> stats -> patches -> train 32s/16s/8s -> evaluate, on a tiny configuration."""
    env = project_env()
    params = tiny_project(project_copy)

    run = dvc(project_copy, "repro", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    for variant in ("fcn32s", "fcn16s", "fcn8s"):
        assert (project_copy / "models" / variant / "model.pt").is_file()
        assert (project_copy / "models" / variant / "checkpoint.pt").is_file()
        overlays = sorted((project_copy / "evaluation" / variant / "overlays").iterdir())
        assert len(overlays) == 2
        live = json.loads((project_copy / "dvclive" / variant / "metrics.json").read_text())
        assert 0.0 <= live["val_mean_iu"] <= 1.0 and live["step"] == 1

    shown = dvc(project_copy, "metrics", "show", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    revisions = json.loads(shown.stdout)  # the workspace is "" (or "workspace")
    workspace = revisions.get("", revisions.get("workspace"))["data"]
    for variant in ("fcn32s", "fcn16s", "fcn8s"):
        metrics = workspace[f"metrics/{variant}.json"]["data"]
        assert set(metrics) >= {"pixel_acc", "mean_acc", "mean_iu", "fw_iu", "per_class_iu"}
        assert 0.0 <= metrics["mean_iu"] <= 1.0

    plots = dvc(project_copy, "plots", "show", "--json", env=env)
    assert plots.returncode == 0, plots.stderr
    drawn = json.loads(plots.stdout)["data"]
    assert "evaluation/fcn8s/confusion.csv" in drawn and "val_mean_iu" in drawn

    status = dvc(project_copy, "status", env=env)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout

    # One training knob reruns training and evaluation, not ingest/stats/patches.
    params["train"]["loss_sampling"] = 0.5
    (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = dvc(project_copy, "status", env=env)
    assert "train@fcn32s" in stale.stdout and "ingest" not in stale.stdout, stale.stdout

    # One stage's epochs rerun that stage and what follows it, not the coarser nets.
    params["train"]["loss_sampling"] = 1.0
    params["epochs"]["fcn8s"] = 2
    (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = json.loads(dvc(project_copy, "status", "--json", env=env).stdout)
    assert "train@fcn8s" in stale and "train@fcn16s" not in stale, stale

    # After an experiment (as a study runs them), the committed state comes back with
    # git and DVC alone, checkpoints included: nothing to retrain.
    params["epochs"]["fcn8s"] = 1
    (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = lambda *a: subprocess.run(["git", *a], cwd=project_copy, check=True,  # noqa: E731
                                    capture_output=True)  # fmt: skip
    git("add", "-A")
    git("commit", "-q", "-m", "tiny run")
    before = (project_copy / "models" / "fcn8s" / "checkpoint.pt").read_bytes()
    exp = dvc(project_copy, "exp", "run", "-S", "train.seed=9", env=env)
    assert exp.returncode == 0, exp.stdout + exp.stderr
    assert (project_copy / "models" / "fcn8s" / "checkpoint.pt").read_bytes() != before
    git("checkout", "--", ".")
    restored = dvc(project_copy, "checkout", env=env)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert (project_copy / "models" / "fcn8s" / "checkpoint.pt").read_bytes() == before
    status = dvc(project_copy, "status", env=env)
    assert "up to date" in status.stdout, status.stdout
