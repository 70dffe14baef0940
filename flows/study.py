"""A study: its experiments with DVC, then its report (no Prefect here).

``fcn-pipeline study studies/<name>.yaml`` runs :func:`run_study` in the project
directory as a plain program, or, with ``PREFECT_API_URL`` set, inside the study flow
(:func:`flows.pipeline.study_flow`, also the ``fcn-pipeline/study`` deployment), which
passes its run's id down so every experiment's stages are its child runs. The study
file is checked against ``params.yaml`` before any experiment starts. Each finished
run's record is kept in ``reports/<name>.runs/<run>.json`` as soon as it finishes;
runs recorded there, in the study's earlier ``results.json`` with the same overrides
(seeds added after a report) or listed by ``dvc exp show`` are skipped (a study
resumes, also in a fresh clone where only the committed files are left), the others
run one after the other (DVC holds one repository lock) or in lanes, a run that a killed
study was training in a lane from the checkpoints it left there;
``reports/<name>/`` is written atomically at the end from the records (each with its
overrides and commit), and the records' directory is removed.
Nothing heavy is imported at module level.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from fcn_pipeline.errors import PipelineError
from flows import study_driver
from flows.dvc_driver import Logger


def _run_in_lanes(
    project_dir: str, pending: list, params_bytes: bytes, jobs: int, logger: Logger,
    env: dict[str, str], finished: Callable[[Any], None],
) -> list[str]:  # fmt: skip
    """Run ``pending`` ``jobs`` at a time, each in the next free lane; the names run.
    Each finished experiment is fetched into the project at once and handed to
    ``finished``.

    A failed experiment does not stop the others; once every lane's experiments are
    fetched into the project, the first failure is raised (a rerun resumes)."""
    logger.info("%d experiments, %d at a time, %s each", len(pending), jobs, env)
    ran: list[str] = []
    failed: list[Future] = []
    with study_driver.lanes(project_dir, jobs, logger) as free, ThreadPoolExecutor(jobs) as pool:
        queue, running = list(pending), {}
        while queue or running:
            while free and queue:
                run, lane = queue.pop(0), free.pop()
                future = pool.submit(
                    study_driver.run_experiment, lane, run, params_bytes,
                    _named(logger, run.name), {**env, **study_driver.resume_env(project_dir, run)},
                )  # fmt: skip
                running[future] = (lane, run)
            future = next(as_completed(list(running)))
            lane, run = running.pop(future)
            free.append(lane)
            if future.exception() is not None:
                logger.error("%s failed in lane %s: %s", run.name, lane, future.exception())
                failed.append(future)
            else:
                study_driver.fetch_experiments(project_dir, Path(lane))
                finished(run)
                study_driver.drop_checkpoints(project_dir, run)
                ran.append(run.name)
    if failed:
        failed[0].result()  # raises that experiment's error
    return ran


class _Named(logging.LoggerAdapter):
    """Lines of one experiment among interleaved lanes, prefixed with its name."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['name']}] {msg}", kwargs


def _named(logger: Logger, name: str) -> Logger:
    return _Named(logger, {"name": name})


def run_study(
    study_file: str, params_file: str, reports: str, jobs: int, logger: Logger,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run every (setting, seed) of ``study_file`` as a named DVC experiment and write
    ``<reports>/<study>/`` (results.json, report.md, plots). ``jobs`` > 1: that many
    experiments at a time, in lanes (:mod:`flows.study_driver`), from a committed HEAD.
    ``env``: set for DVC on top of the lanes' threads (a Prefect parent run's id).

    Returns the names run and skipped and the report directory.
    """
    from fcn_pipeline.study import load_finished, load_study, restore_finished, write_report

    env = env or {}
    project_dir = os.getcwd()
    study = load_study(study_file, params_file)  # refuses bad input before any experiment
    study_driver.check_index(project_dir)  # a killed experiment's leftovers stop dvc exp run
    study_driver.check_params_left_over(project_dir, study, params_file)  # and its overrides
    params_path = Path(project_dir, params_file)
    params_bytes = params_path.read_bytes()
    if jobs < 1:
        raise PipelineError(f"jobs: {jobs}: run at least one experiment at a time")
    study_driver.collect_left_over(project_dir, logger)  # a killed study's finished runs
    finished = Path(reports) / f"{study.name}.runs"  # records of the runs done so far
    archive = Path(reports) / study.name / "results.json"  # an earlier report's records
    for name in restore_finished(finished, archive, study.runs):
        logger.info("%s: restored from %s", name, archive)

    def keep(*runs: Any) -> None:
        study_driver.keep_finished(project_dir, study, finished, list(runs), logger)

    keep(*study.runs)  # what dvc exp show lists and is not recorded yet
    done = {run.name for run in study.runs if load_finished(finished, run)}
    skipped = [run.name for run in study.runs if run.name in done]
    for name in skipped:
        logger.info("%s: finished, recorded in %s, skipped", name, finished)
    pending = [run for run in study.runs if run.name not in done]
    study_driver.set_aside_checkpoints(project_dir, pending, logger)  # killed lanes' runs
    if jobs > 1 and pending:  # lanes even for the last run: its threads stay the study's
        study_driver.check_committed(project_dir)  # before any lane or experiment
        env = {**study_driver.lane_env(jobs, len(study.runs)), **env}
        lanes = min(jobs, len(pending))
        ran = _run_in_lanes(project_dir, pending, params_bytes, lanes, logger, env, keep)
    else:
        ran = []
        try:
            for run in pending:
                resume = study_driver.resume_env(project_dir, run)
                study_driver.run_experiment(
                    project_dir, run, params_bytes, logger, {**env, **resume}
                )
                keep(run)
                study_driver.drop_checkpoints(project_dir, run)
                ran.append(run.name)
        finally:
            params_path.write_bytes(params_bytes)  # the study's overrides never stay behind
    results = study_driver.collect_results(project_dir, study, finished)
    out = write_report(str(Path(reports) / study.name), results, study.comparisons)
    shutil.rmtree(finished)  # results.json holds every record now
    logger.info(
        "study %s: ran %d, skipped %d; report in %s", study.name, len(ran), len(skipped), out
    )
    return {"study": study.name, "ran": ran, "skipped": skipped, "report": str(out)}
