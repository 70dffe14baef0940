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

from flows import study_driver
from flows.common import TASK_DEFAULTS


@task(name="dvc-exp-run", **TASK_DEFAULTS)
def run_experiment(project_dir: str, run: Any, params_bytes: bytes) -> dict[str, Any]:
    """One (setting, seed): ``dvc exp run -S ... --name NAME``; never retried."""
    return study_driver.run_experiment(project_dir, run, params_bytes, get_run_logger())


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


# Named like the pipeline's flow so that its deployment is `fcn-pipeline/study`
# (a deployment's full name is <flow name>/<deployment name>).
@flow(name="fcn-pipeline", flow_run_name="study {study_file}")
def study_flow(
    study_file: str, params_file: str = "params.yaml", reports: str = "reports"
) -> dict[str, Any]:
    """Run every (setting, seed) of ``study_file`` as a named DVC experiment and write
    ``<reports>/<study>/`` (results.json, report.md, plots).

    Returns the names run and skipped and the report directory.
    """
    from fcn_pipeline.study import load_study

    logger = get_run_logger()
    project_dir = os.getcwd()
    study = load_study(study_file, params_file)  # refuses bad input before any experiment
    study_driver.check_index(project_dir)  # a killed experiment's leftovers stop dvc exp run
    params_path = Path(project_dir, params_file)
    params_bytes = params_path.read_bytes()
    done = set(list_experiments(project_dir))
    ran, skipped = [], []
    try:
        for run in study.runs:
            if run.name in done:
                logger.info("%s: already in dvc exp show, skipped", run.name)
                skipped.append(run.name)
                continue
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
