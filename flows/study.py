"""A study as a Prefect flow (``study``): its experiments with DVC, then its report.

``fcn-pipeline study studies/<name>.yaml`` and the ``fcn-pipeline/study``
deployment both run :func:`study_flow` in the project directory. The study file
is checked against ``params.yaml`` before any experiment starts; experiments
``dvc exp show`` already lists are skipped (a study resumes), the others run one
after the other (DVC holds one repository lock); ``reports/<name>/`` is written
atomically at the end. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture, as_completed

from fcn_pipeline.errors import PipelineError
from flows import study_driver
from flows.common import TASK_DEFAULTS


@task(name="dvc-exp-run", **TASK_DEFAULTS)
def run_experiment(
    project_dir: str, run: Any, params_bytes: bytes, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """One (setting, seed): ``dvc exp run -S ... --name NAME`` in the project or a lane;
    never retried."""
    return study_driver.run_experiment(project_dir, run, params_bytes, get_run_logger(), env)


@task(name="list-experiments", **TASK_DEFAULTS)
def list_experiments(project_dir: str) -> list[str]:
    """Names of the experiments ``dvc exp show`` lists for the current commit."""
    return sorted(study_driver.list_experiments(project_dir))


@task(name="collect-results", **TASK_DEFAULTS)
def collect_results(project_dir: str, study: Any) -> dict[str, Any]:
    """Every run's metrics and curves, as ``results.json`` holds them."""
    return study_driver.collect_results(project_dir, study, get_run_logger())


@task(name="write-report", **TASK_DEFAULTS)
def write_report(out: str, results: dict[str, Any], pairs: list[tuple[str, str]]) -> str:
    """``results.json``, ``report.md`` and the PNGs, written atomically."""
    from fcn_pipeline.study import write_report as write

    path = write(out, results, pairs)
    report = (path / "report.md").read_text()
    create_markdown_artifact(markdown=report, key="fcn-study", description=f"study {out}")
    return str(path)


def _run_in_lanes(project_dir: str, pending: list, params_bytes: bytes, jobs: int) -> list[str]:
    """Run ``pending`` ``jobs`` at a time, each in the next free lane; the names run.

    A failed experiment does not stop the others; once every lane's experiments are
    fetched into the project, the first failure is raised (a rerun resumes)."""
    logger = get_run_logger()
    env = study_driver.lane_env(jobs)
    logger.info("%d experiments, %d at a time, %s each", len(pending), jobs, env)
    ran: list[str] = []
    failed: list[PrefectFuture] = []
    with study_driver.lanes(project_dir, jobs, logger) as free:
        queue, running = list(pending), {}
        while queue or running:
            while free and queue:
                run, lane = queue.pop(0), free.pop()
                task = run_experiment.with_options(name=f"dvc-exp-run-{run.name}")
                running[task.submit(lane, run, params_bytes, env)] = (lane, run)
            future = next(as_completed(list(running)))
            lane, run = running.pop(future)
            free.append(lane)
            # The task's own outcome: `future.state` may still read Running here, since
            # Prefect records task states on the server asynchronously.
            try:
                future.result()
            except Exception:
                logger.error("%s failed in lane %s", run.name, lane)
                failed.append(future)
            else:
                ran.append(run.name)
    if failed:
        failed[0].result()  # raises that experiment's error
    return ran


# Named like the pipeline's flow so that its deployment is `fcn-pipeline/study`
# (a deployment's full name is <flow name>/<deployment name>).
@flow(name="fcn-pipeline", flow_run_name="study {study_file}")
def study_flow(
    study_file: str, params_file: str = "params.yaml", reports: str = "reports", jobs: int = 1
) -> dict[str, Any]:
    """Run every (setting, seed) of ``study_file`` as a named DVC experiment and write
    ``<reports>/<study>/`` (results.json, report.md, plots). ``jobs`` > 1: that many
    experiments at a time, in lanes (:mod:`flows.study_driver`), from a committed HEAD.

    Returns the names run and skipped and the report directory.
    """
    from fcn_pipeline.study import load_study

    logger = get_run_logger()
    project_dir = os.getcwd()
    study = load_study(study_file, params_file)  # refuses bad input before any experiment
    study_driver.check_index(project_dir)  # a killed experiment's leftovers stop dvc exp run
    params_path = Path(project_dir, params_file)
    params_bytes = params_path.read_bytes()
    if jobs < 1:
        raise PipelineError(f"jobs: {jobs}: run at least one experiment at a time")
    done = set(list_experiments(project_dir))
    skipped = [run.name for run in study.runs if run.name in done]
    for name in skipped:
        logger.info("%s: already in dvc exp show, skipped", name)
    pending = [run for run in study.runs if run.name not in done]
    if jobs > 1 and len(pending) > 1:
        study_driver.check_committed(project_dir)  # before any lane or experiment
        ran = _run_in_lanes(project_dir, pending, params_bytes, min(jobs, len(pending)))
    else:
        ran = []
        try:
            for run in pending:
                run_experiment.with_options(name=f"dvc-exp-run-{run.name}")(
                    project_dir, run, params_bytes
                )
                ran.append(run.name)
        finally:
            params_path.write_bytes(params_bytes)  # the study's overrides never stay behind
    results = collect_results(project_dir, study)
    out = write_report(str(Path(reports) / study.name), results, study.comparisons)
    logger.info(
        "study %s: ran %d, skipped %d; report in %s", study.name, len(ran), len(skipped), out
    )
    return {"study": study.name, "ran": ran, "skipped": skipped, "report": out}
