"""Running a study's experiments with DVC and reading back what each produced.

Every (setting, seed) of a study (:mod:`fcn_pipeline.study`) is one workspace
``dvc exp run -S ... --name <study>-<setting>-s<seed>``, so ``dvc exp show``
lists them and DVC's run cache restores stages that already ran with the same
inputs (the data stages, shared by all runs). Experiments that ``dvc exp show``
already lists for the current commit are not run again: an interrupted study
resumes where it stopped. ``dvc exp show --json`` names the experiments and their
commits; metrics files and the per-epoch DVCLive curves are read from each
experiment's commit (``git show``), since ``exp show`` leaves out null values. No
Prefect here: :mod:`flows.study` wraps these functions in tasks.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from fcn_pipeline.errors import PipelineError
from fcn_pipeline.study import STAGED, RunSpec, Study, run_record, training_curve, tsv_column
from flows.dvc_driver import Logger, _executable, run_dvc, subprocess_env

CURVE_METRICS = ("train_images", "images_per_second", "val_mean_iu")


def list_experiments(project_dir: str) -> dict[str, dict[str, Any]]:
    """``{name: {"rev": sha, "metrics": {file: {...}}}}`` of the experiments
    ``dvc exp show --json`` lists for the current commit."""
    result = subprocess.run(
        [_executable("dvc"), "exp", "show", "--json"],
        cwd=project_dir, env=subprocess_env(), capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"dvc exp show failed ({result.returncode}): {result.stderr.strip()}")
    found: dict[str, dict[str, Any]] = {}
    for baseline in json.loads(result.stdout or "[]"):
        for exp_range in baseline.get("experiments") or []:
            head = (exp_range.get("revs") or [{}])[0]  # the experiment's last commit
            name = exp_range.get("name") or head.get("name")
            data = head.get("data") or {}
            if name and not head.get("error"):
                metrics = {
                    path: entry.get("data") or {}
                    for path, entry in (data.get("metrics") or {}).items()
                    if isinstance(entry, dict)
                }
                found[name] = {"rev": head.get("rev") or data.get("rev"), "metrics": metrics}
    return found


def check_index(project_dir: str) -> None:
    """Refuse to start while the git index holds staged changes.

    ``dvc exp run`` stashes the workspace and applies it again; staged entries make
    that apply fail ("Stash apply resulted in merge conflicts") before any stage runs.
    An experiment killed halfway leaves such entries (its ``dvc.lock``, DVCLive's
    temporary files), so this names them and the way out. Raises
    :class:`fcn_pipeline.errors.PipelineError`.
    """
    result = subprocess.run(
        ["git", "diff", "--cached", "--name-only"],
        cwd=project_dir, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise PipelineError(f"{project_dir}: not a git work tree ({result.stderr.strip()})")
    staged = result.stdout.split()
    if staged:
        shown = ", ".join(staged[:3]) + (f" and {len(staged) - 3} more" if len(staged) > 3 else "")
        raise PipelineError(
            f"{project_dir}: the git index has staged changes ({shown}), which dvc exp run "
            "cannot stash and apply again; an interrupted experiment leaves them. Commit them, "
            "or unstage them with `git reset` (files stay as they are), then run the study "
            "again: finished experiments are skipped"
        )


def run_experiment(project_dir: str, run: RunSpec, params_bytes: bytes, logger: Logger) -> dict:
    """``dvc exp run -S ... --name <run.name>`` from the study's starting ``params.yaml``.

    ``params.yaml`` gets its original bytes back first: ``-S`` rewrites it in the
    workspace, and one run's overrides must not leak into the next. Raises
    :class:`flows.dvc_driver.DvcStageError` naming the failing stage.
    """
    Path(project_dir, "params.yaml").write_bytes(params_bytes)
    command = ["exp", "run"]
    for override in run.overrides:
        command += ["-S", override]
    result = run_dvc([*command, "--name", run.name], project_dir, logger)
    result["experiment"] = run.name
    return result


def _git_show(project_dir: str, rev: str, path: str) -> str | None:
    result = subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=project_dir, capture_output=True, text=True
    )
    return result.stdout if result.returncode == 0 else None


def _trained(run: RunSpec) -> tuple[str, ...]:
    """The staged nets a run trains, in order, up to and including its variant."""
    return STAGED[: STAGED.index(run.variant) + 1]


def read_curve(project_dir: str, rev: str, run: RunSpec) -> dict[str, list[float]]:
    """The run's validation curve over its staged trainings, from its commit."""
    stages = []
    for variant in _trained(run):
        texts = {m: _git_show(project_dir, rev, run.curve_path(variant, m)) for m in CURVE_METRICS}
        if all(texts.values()):
            stages.append({m: tsv_column(text, m) for m, text in texts.items() if text})
    return training_curve(stages)


def read_stages(project_dir: str, rev: str, run: RunSpec) -> dict[str, dict[str, Any]]:
    """The test metrics (``metrics/<net>.json``) of each staged net the run trained up
    to and including its variant (FCN-32s, FCN-16s, ...), from its commit."""
    stages = {}
    for variant in _trained(run):
        text = _git_show(project_dir, rev, f"{run.params.evaluate.metrics}/{variant}.json")
        if text:
            stages[variant] = json.loads(text)
    return stages


def collect_results(project_dir: str, study: Study, logger: Logger) -> dict[str, Any]:
    """``results.json``'s content, read from ``dvc exp show`` and the experiments' commits."""
    listed = list_experiments(project_dir)
    missing = [run.name for run in study.runs if run.name not in listed]
    if missing:
        raise RuntimeError(f"dvc exp show does not list experiment(s) {missing}")
    runs = []
    for run in study.runs:
        entry = listed[run.name]
        # The metrics files as the experiment committed them: `dvc exp show` drops null
        # values (a class absent from the split has IU null), results.json keeps them.
        stages = read_stages(project_dir, entry["rev"], run)
        metrics = stages.get(run.variant) or entry["metrics"].get(run.metrics_path)
        if not metrics:
            raise RuntimeError(f"experiment {run.name}: no {run.metrics_path} in dvc exp show")
        curve = read_curve(project_dir, entry["rev"], run)
        runs.append(run_record(run, metrics, curve, stages, study.spec.target_val_mean_iu))
        logger.info("%s: mean IU %s", run.name, runs[-1]["metrics"]["mean_iu"])
    formats = sorted({run.params.data.format for run in study.runs})
    return {
        "study": study.name,
        "dataset": formats[0] if len(formats) == 1 else formats,
        "variant": study.spec.variant,
        "seeds": study.spec.seeds,
        "target_val_mean_iu": study.spec.target_val_mean_iu,
        "runs": runs,
    }
