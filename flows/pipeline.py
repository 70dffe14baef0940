"""The whole pipeline as one Prefect flow (``fcn-pipeline``) that runs DVC.

DVC stays in charge of the pipeline: the flow runs ``dvc repro [targets]`` (or
``dvc exp run -S key=value ... --name NAME [targets]`` for an experiment) in
the project directory, so DVC decides which stages are stale, runs their
commands (``fcn-pipeline <stage>``, each a child flow run of this one: the flow
run's id goes down in DVC's environment, :mod:`flows.stage_runs`) and records
what ran in ``dvc.lock`` and its cache. Nothing here
re-implements a stage: ``dvc repro`` by hand and a deployment run execute the
same stage code.

The flow streams DVC's output into the run log, fails with a message naming
the failing stage and its error lines (which name the offending files), puts
the last good outputs back when a stage fails (DVC deletes them before running
it), and on success publishes the metrics DVC reports as a markdown artifact
(key ``pipeline-summary``) with the revision they belong to. The DVC driving itself
lives in :mod:`flows.dvc_driver`; this module only makes tasks of it.

Nothing heavy is imported at module level (no torch, no DVC), so
``prefect deploy`` loads this module quickly.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff

from flows import dvc_driver
from flows.common import TASK_DEFAULTS
from flows.dvc_driver import DvcStageError, dvc_command
from flows.stage_runs import parent_env
from flows.summary import metrics_markdown

ARTIFACT_KEY = "pipeline-summary"
RETRIED = {"retries": 2, "retry_delay_seconds": exponential_backoff(backoff_factor=1)}


@task(name="dvc-repro", **TASK_DEFAULTS)
def run_dvc(command: list[str], project_dir: str) -> dict[str, Any]:
    """Run ``dvc <command>`` in ``project_dir``, streaming its output into the run log.

    Never retried: a failed stage fails the same way again, and DVC itself
    decides what to re-run next time. Raises :class:`DvcStageError` naming the
    failing stage and its error lines when DVC exits non-zero.
    """
    return dvc_driver.run_dvc(command, project_dir, get_run_logger(), parent_env())


@task(name="back-up-uncached-outputs", **TASK_DEFAULTS)
def back_up_uncached_outputs(project_dir: str, backup_dir: str) -> list[str]:
    """Copy the outputs DVC does not cache (metrics, DVCLive curves) into ``backup_dir``."""
    return dvc_driver.back_up_uncached_outputs(project_dir, backup_dir)


@task(name="restore-workspace", **TASK_DEFAULTS)
def restore_workspace(
    project_dir: str, params_files: dict[str, bytes], backup_dir: str, uncached: list[str]
) -> None:
    """Put the params files, uncached and cached outputs back as before a failed run."""
    dvc_driver.restore_workspace(project_dir, params_files, backup_dir, uncached, get_run_logger())


@task(name="read-dvc-metrics", **{**RETRIED, "retries": 3}, **TASK_DEFAULTS)
def read_metrics(project_dir: str) -> dict[str, dict[str, Any]]:
    """``dvc metrics show --json`` of the workspace, as ``{metrics file: {metric: value}}``."""
    return dvc_driver.read_metrics(project_dir, get_run_logger())


@task(name="read-dvc-metrics-diff", **RETRIED, **TASK_DEFAULTS)
def read_metrics_diff(project_dir: str) -> dict[str, dict[str, Any]]:
    """``dvc metrics diff --json``: the workspace's metrics against the commit's."""
    return dvc_driver.read_metrics_diff(project_dir)


@task(name="read-dvc-revision", **RETRIED, **TASK_DEFAULTS)
def read_revision(project_dir: str, experiment: str | None) -> dict[str, str | None]:
    """The git commit the workspace is based on and, for an experiment, its name and ref sha."""
    return dvc_driver.read_revision(project_dir, experiment)


@task(name="publish-metrics-artifact", **RETRIED, **TASK_DEFAULTS)
def publish_metrics(markdown: str, summary: str) -> str:
    """Create the ``pipeline-summary`` markdown artifact; returns its id."""
    return str(create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY, description=summary))


@flow(name="fcn-pipeline")
def pipeline_flow(
    targets: list[str] | None = None,
    overrides: list[str] | None = None,
    experiment: bool = False,
    experiment_name: str | None = None,
) -> dict[str, Any]:
    """Reproduce the pipeline with DVC and publish the resulting metrics.

    Args:
        targets: stages (or dvc.yaml paths) to reproduce with their upstream
            stages; empty means every stage.
        overrides: ``key=value`` parameter overrides as ``dvc exp run -S``
            takes them (``data.synthetic.seed=1``); need ``experiment``.
        experiment: run ``dvc exp run`` (an experiment, listed by ``dvc exp
            show``) instead of ``dvc repro``.
        experiment_name: the experiment's name (``--name``); default
            ``run-<date>-<time>``, so the flow always knows which one it ran.

    Returns what DVC ran and skipped, the metrics per file and the revision.
    """
    logger = get_run_logger()
    project_dir = os.getcwd()
    if not (Path(project_dir) / "dvc.yaml").is_file():
        raise FileNotFoundError(
            f"no dvc.yaml in {project_dir}: the flow must run in the project directory "
            "(prefect.yaml's set_working_directory pull step)"
        )
    overrides = list(overrides or [])
    if experiment and not experiment_name:
        experiment_name = time.strftime("run-%Y%m%d-%H%M%S")
    command = dvc_command(list(targets or []), overrides, experiment, experiment_name)
    params_before = dvc_driver.params_files(project_dir, overrides) if experiment else {}
    with tempfile.TemporaryDirectory(prefix="fcn-pipeline-backup-") as backup_dir:
        uncached = back_up_uncached_outputs(project_dir, backup_dir)
        try:
            dvc_run = run_dvc.with_options(name="dvc-exp-run" if experiment else "dvc-repro")(
                command, project_dir
            )
        except DvcStageError as error:
            if error.stages or params_before:
                restore_workspace(project_dir, params_before, backup_dir, uncached)
            raise
    dvc_run["experiment"] = experiment_name if experiment else None
    metrics = read_metrics(project_dir)
    diff = read_metrics_diff(project_dir)
    revision = read_revision(project_dir, dvc_run["experiment"])
    summary = f"{len(metrics)} metrics file(s) at {revision['commit'][:7]}"
    if revision["experiment"]:
        summary += f", experiment {revision['experiment']}"
    publish_metrics(metrics_markdown(metrics, revision, dvc_run, diff), summary)
    logger.info("pipeline done: %s", summary)
    return {"dvc": dvc_run, "metrics": metrics, "diff": diff, "revision": revision}


# Named like the pipeline's flow so that its deployment is `fcn-pipeline/study`
# (a deployment's full name is <flow name>/<deployment name>).
@flow(name="fcn-pipeline", flow_run_name="study {study_file}")
def study_flow(
    study_file: str, params_file: str = "params.yaml", reports: str = "reports", jobs: int = 1
) -> dict[str, Any]:
    """:func:`flows.study.run_study` as a flow run: every experiment's stages are its
    child runs, and the report is a markdown artifact (key ``fcn-study``)."""
    from flows.study import run_study

    result = run_study(study_file, params_file, reports, jobs, get_run_logger(), parent_env())
    report = (Path(result["report"]) / "report.md").read_text()
    create_markdown_artifact(markdown=report, key="fcn-study", description=f"study {study_file}")
    return result


if __name__ == "__main__":
    pipeline_flow()
