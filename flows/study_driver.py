"""Running a study's experiments with DVC and reading back what each produced.

Every (setting, seed) of a study (:mod:`fcn_pipeline.study`) is one workspace
``dvc exp run -S ... --name <study>-<setting>-s<seed>``, so ``dvc exp show``
lists them and DVC's run cache restores stages that already ran with the same
inputs (the data stages, shared by all runs). ``dvc exp show --json`` names the
experiments and their commits; metrics files and the per-epoch DVCLive curves are read
from each experiment's commit (``git show``), since ``exp show`` leaves out null values,
into the run's record, kept as a file as soon as the run finishes
(:func:`keep_finished`): an interrupted study resumes where it stopped, from its
experiments or, where they are gone (experiment refs live in one clone's ``.git``),
from those files. No
Prefect here: :mod:`flows.study` wraps these functions in tasks.

With ``jobs`` > 1 the experiments run in *lanes*: clones of HEAD beside the project
(``<parent>/.<project>.study-lane-<i>``: siblings, so a relative ``data.root`` such
as ``../datasets/camvid`` means the same there), sharing the project's DVC cache
(and so its run cache), each experiment with ``cores / min(jobs, runs)`` torch threads
(``runs``: the study's, not those left, so a resumed run keeps its threads). Their
experiment refs are fetched into the project once all have run (or one failed), then
the lanes are removed: ``dvc exp show`` lists them as if they had run in the workspace. Small
nets use threads poorly: two one-thread lanes on two cores train about twice as
many images per second as one two-thread run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import yaml

from fcn_pipeline.config import parse_overrides, parse_params
from fcn_pipeline.errors import ConfigError, PipelineError
from fcn_pipeline.runtime import machine_description
from fcn_pipeline.study import (
    STAGED,
    RunRecord,
    RunSpec,
    Study,
    load_finished,
    run_record,
    save_finished,
    training_curve,
    tsv_column,
)
from flows.dvc_driver import Logger, command, dvc, dvc_json, git, run_dvc
from flows.train import RESUME_ENV

CURVE_METRICS = ("train_images", "images_per_second", "val_mean_iu")


def list_experiments(project_dir: str) -> dict[str, dict[str, Any]]:
    """``{name: {"rev": sha, "metrics": {file: {...}}}}`` of the experiments
    ``dvc exp show --json`` lists for the current commit."""
    found: dict[str, dict[str, Any]] = {}
    for baseline in dvc_json("exp", "show", cwd=project_dir) or []:
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


def _named(paths: list[str]) -> str:
    """The first three of ``paths``, and how many more."""
    more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
    return ", ".join(paths[:3]) + more


def check_index(project_dir: str) -> None:
    """Refuse to start while the git index holds staged changes.

    ``dvc exp run`` stashes the workspace and applies it again; staged entries make
    that apply fail ("Stash apply resulted in merge conflicts") before any stage runs.
    An experiment killed halfway leaves such entries (its ``dvc.lock``, DVCLive's
    temporary files), so this names them and the way out. Raises
    :class:`fcn_pipeline.errors.PipelineError`.
    """
    git("rev-parse", "--is-inside-work-tree", cwd=project_dir)  # else: git's own words
    staged = git("diff", "--cached", "--name-only", cwd=project_dir).split()
    if staged:
        raise PipelineError(
            f"{project_dir}: the git index has staged changes ({_named(staged)}), which "
            "dvc exp run cannot stash and apply again; an interrupted experiment leaves "
            "them. Commit them, or unstage them with `git reset` (files stay as they are), "
            "then run the study again: finished experiments are skipped"
        )


def check_params_left_over(project_dir: str, study: Study, params_file: str) -> None:
    """Refuse to start while ``params_file`` is HEAD's with one run's overrides applied.

    ``dvc exp run -S`` writes a run's overrides into the workspace's ``params.yaml``; a
    study restores it after each run, but one killed while a run trained in the
    workspace leaves them there, and the next study would take them for its base (every
    run of another setting would inherit them). Raises
    :class:`fcn_pipeline.errors.PipelineError` naming the run and the way out."""
    committed = _git_show(project_dir, "HEAD", params_file)
    workspace = Path(project_dir, params_file).read_text()
    if committed is None or workspace == committed:
        return
    try:
        params = parse_params(yaml.safe_load(workspace), source=params_file)
        head = yaml.safe_load(committed)
    except (yaml.YAMLError, ConfigError):
        return  # load_study has read it; HEAD's may not parse
    for run in study.runs:
        try:
            overridden = parse_params(head, overrides=parse_overrides(run.overrides))
        except ConfigError:
            continue  # HEAD's params are not this study's: nothing to compare
        if overridden == params:
            raise PipelineError(
                f"{project_dir}/{params_file}: it holds HEAD's params with the overrides of "
                f"run {run.name}, which a study killed while that run trained in the "
                f"workspace leaves there; the study would take them for its base. Restore it "
                f"(`git checkout {params_file}`) and run the study again: finished runs are "
                "skipped"
            )


def run_experiment(
    project_dir: str,
    run: RunSpec,
    params_bytes: bytes,
    logger: Logger,
    env: dict[str, str] | None = None,
) -> dict:
    """``dvc exp run -S ... --name <run.name>`` from the study's starting ``params.yaml``.

    ``params.yaml`` gets its original bytes back first: ``-S`` rewrites it in the
    workspace, and one run's overrides must not leak into the next. ``env``: extra
    environment (a lane's thread counts). Raises
    :class:`flows.dvc_driver.DvcStageError` naming the failing stage.
    """
    Path(project_dir, "params.yaml").write_bytes(params_bytes)
    command = ["exp", "run"]
    for override in run.overrides:
        command += ["-S", override]
    result = run_dvc([*command, "--name", run.name], project_dir, logger, env)
    result["experiment"] = run.name
    return result


def check_committed(project_dir: str) -> None:
    """Lanes run clones of HEAD: refuse when tracked files differ from it, naming them
    (they would not be in the clones, so the experiments would not be what the
    workspace says)."""
    status = git("status", "--porcelain", "--untracked-files=no", cwd=project_dir)
    changed = [line[3:] for line in status.splitlines()]
    if changed:
        raise PipelineError(
            f"{project_dir}: jobs > 1 runs the experiments in clones of HEAD, but "
            f"{_named(changed)} differ from HEAD: commit them (or run with one job, in the "
            "workspace)"
        )


def lane_env(jobs: int, runs: int) -> dict[str, str]:
    """Torch (OpenMP, MKL) threads for one of ``jobs`` lanes of a study of ``runs`` runs:
    the cores shared out among ``min(jobs, runs)`` lanes (a one-run study's lane gets
    them all), unless the environment already fixes them. It depends on the study, not
    on the runs still pending, so a run resumed after a stop keeps its thread count (part
    of its checkpoint's fingerprint)."""
    threads = str(max(1, (os.cpu_count() or 1) // max(1, min(jobs, runs))))
    return {k: os.environ.get(k, threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def lane_paths(project_dir: str, jobs: int) -> list[Path]:
    project = Path(project_dir).resolve()
    return [project.parent / f".{project.name}.study-lane-{i}" for i in range(jobs)]


def dvc_cache_dir(project_dir: str) -> str:
    """The project's DVC cache directory, absolute."""
    return str(Path(dvc("cache", "dir", cwd=project_dir).strip()).resolve())


def make_lane(project_dir: str, lane: Path, cache: str) -> None:
    """A clone of the project's HEAD at ``lane`` (objects shared with the project) with
    the project's git identity and DVC local config, using the DVC cache ``cache``."""
    project = Path(project_dir).resolve()
    shutil.rmtree(lane, ignore_errors=True)  # one a killed study left behind
    head = git("rev-parse", "HEAD", cwd=project).strip()
    git("clone", "--quiet", "--shared", "--no-checkout", str(project), str(lane),
        cwd=project.parent)  # fmt: skip
    git("checkout", "--quiet", "--detach", head, cwd=lane)
    for key in ("user.name", "user.email"):
        if value := git("config", key, cwd=project, check=False).strip():
            git("config", key, value, cwd=lane)
    local = project / ".dvc" / "config.local"
    if local.is_file():
        shutil.copy2(local, lane / ".dvc" / "config.local")
    dvc("cache", "dir", "--local", cache, cwd=lane)


def fetch_experiments(project_dir: str, lane: Path) -> list[str]:
    """Copy the lane's experiment refs (``refs/exps/<baseline>/<name>``, not DVC's
    transient exec and stash refs) and their commits into the project; their names."""
    refs = [
        ref
        for ref in git("for-each-ref", "--format=%(refname)", "refs/exps", cwd=lane).split()
        if len(ref.split("/")) == 5
    ]
    if refs:
        git("fetch", "--quiet", "--no-tags", str(lane), *(f"+{r}:{r}" for r in refs),
            cwd=project_dir)  # fmt: skip
    return [ref.rsplit("/", 1)[-1] for ref in refs]


def _collect(project_dir: str, path: Path, which: str, logger: Logger) -> None:
    if (path / ".git").exists():
        fetched = fetch_experiments(project_dir, path)
        logger.info("%s %s: fetched %s", which, path, ", ".join(fetched) or "nothing")


def collect_left_over(project_dir: str, logger: Logger) -> None:
    """Fetch the finished experiments of every lane a killed study left beside the
    project, so that the study, listing what is done, skips them."""
    project = Path(project_dir).resolve()
    for path in sorted(project.parent.glob(f".{project.name}.study-lane-*")):
        _collect(project_dir, path, "lane left over", logger)


@contextmanager
def lanes(project_dir: str, jobs: int, logger: Logger) -> Iterator[list[str]]:
    """``jobs`` lanes for the block, each a clone of HEAD made afresh (a lane a killed
    study left gives up its experiments first: :func:`collect_left_over`); on the way
    out (also after a failure) every lane's experiments are fetched into the project and
    the lane is removed."""
    paths = lane_paths(project_dir, jobs)
    try:
        cache = dvc_cache_dir(project_dir)
        collect_left_over(project_dir, logger)
        for path in paths:
            make_lane(project_dir, path, cache)
            logger.info("lane %s: a clone of HEAD sharing the DVC cache %s", path, cache)
        yield [str(path) for path in paths]
    finally:
        for path in paths:
            _collect(project_dir, path, "lane", logger)
            shutil.rmtree(path, ignore_errors=True)


def resume_dir(project_dir: str, run: RunSpec) -> Path:
    """Where the checkpoints of a run a killed study was training in a lane wait for its
    next lane: ``<parent>/.<project>.study-resume/<run>/<variant>/checkpoint.pt``."""
    project = Path(project_dir).resolve()
    return project.parent / f".{project.name}.study-resume" / run.name


def _lane_run(lane: Path, pending: list[RunSpec]) -> RunSpec | None:
    """The pending run whose params ``lane``'s ``params.yaml`` holds (``dvc exp run -S``
    writes them there), if any."""
    try:
        raw = yaml.safe_load((lane / "params.yaml").read_text()) or {}
        params = parse_params(raw, source=str(lane / "params.yaml"))
    except (OSError, yaml.YAMLError, ConfigError):
        return None
    return next((run for run in pending if run.params == params), None)


def _committed_md5s(project_dir: str) -> set[str]:
    """The md5 of every output HEAD's ``dvc.lock`` records."""
    text = _git_show(project_dir, "HEAD", "dvc.lock") or ""
    stages = (yaml.safe_load(text) or {}).get("stages") or {}
    return {out.get("md5") for stage in stages.values() for out in stage.get("outs") or []}


def _md5(path: Path) -> str:
    """Hex MD5 of a file's bytes, as DVC records an output's."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def set_aside_checkpoints(project_dir: str, pending: list[RunSpec], logger: Logger) -> None:
    """Keep the checkpoints of the runs a killed study was training in its lanes before
    the lanes are made afresh: a left-over lane whose ``params.yaml`` is a pending run's
    gives up that run's checkpoints to :func:`resume_dir` (replacing older ones kept
    there; not the committed ones, which ``dvc exp run`` checks out before it trains),
    and the run's next ``dvc exp run`` resumes from them (:func:`resume_env`). The
    checkpoint's fingerprint still decides: one of other params, data, threads or
    initial weights is not resumed."""
    from fcn_pipeline.checkpoints import CHECKPOINT_FILE

    project = Path(project_dir).resolve()
    committed = _committed_md5s(project_dir)
    for lane in sorted(project.parent.glob(f".{project.name}.study-lane-*")):
        run = _lane_run(lane, pending)
        if run is None or Path(run.params.train.out).is_absolute():  # not the lane's own
            continue
        kept = []
        for variant in _trained(run):
            source = lane / run.params.train.out / variant / CHECKPOINT_FILE
            if source.is_file() and _md5(source) not in committed:
                target = resume_dir(project_dir, run) / variant / CHECKPOINT_FILE
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)  # a sibling: the same file system
                kept.append(variant)
        if kept:
            logger.info(
                "%s: kept the %s checkpoints of lane %s to resume from in %s", run.name,
                ", ".join(kept), lane, resume_dir(project_dir, run),
            )  # fmt: skip


def resume_env(project_dir: str, run: RunSpec) -> dict[str, str]:
    """The environment that makes ``run``'s train stages resume from the checkpoints
    :func:`set_aside_checkpoints` kept (``flows.train.RESUME_ENV``), if any."""
    kept = resume_dir(project_dir, run)
    return {RESUME_ENV: str(kept)} if kept.is_dir() else {}


def drop_checkpoints(project_dir: str, run: RunSpec) -> None:
    """Delete the kept checkpoints of a run that has finished."""
    kept = resume_dir(project_dir, run)
    shutil.rmtree(kept, ignore_errors=True)
    with suppress(OSError):  # other runs' still wait there
        kept.parent.rmdir()


def _git_show(project_dir: str, rev: str, path: str) -> str | None:
    result = command("git", "show", f"{rev}:{path}", cwd=project_dir, check=False)
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


def experiment_record(
    project_dir: str, run: RunSpec, entry: dict[str, Any], target: float | None
) -> RunRecord:
    """A run's record from its experiment (``entry``: its :func:`list_experiments` item):
    the metrics files as the experiment committed them (``dvc exp show`` drops null
    values: a class absent from the split has IU null; the record keeps them)."""
    stages = read_stages(project_dir, entry["rev"], run)
    metrics = stages.get(run.variant) or entry["metrics"].get(run.metrics_path)
    if not metrics:
        raise RuntimeError(f"experiment {run.name}: no {run.metrics_path} in dvc exp show")
    curve = read_curve(project_dir, entry["rev"], run)
    return run_record(run, metrics, curve, stages, target)


def keep_finished(
    project_dir: str, study: Study, finished: Path, runs: list[RunSpec], logger: Logger
) -> None:
    """Save the record of each of ``runs`` that ``dvc exp show`` lists and ``finished``
    does not hold yet (:func:`fcn_pipeline.study.save_finished`)."""
    todo = [run for run in runs if load_finished(finished, run) is None]
    if not todo:
        return
    listed = list_experiments(project_dir)
    commit = git("rev-parse", "HEAD", cwd=project_dir).strip()
    # This clone's experiments ran on this machine (lanes are its siblings); one pulled
    # from a DVC remote would be labelled with it too.
    machine = machine_description()
    for run in (run for run in todo if run.name in listed):
        record = experiment_record(
            project_dir, run, listed[run.name], study.spec.target_val_mean_iu
        )
        record = dataclasses.replace(record, machine=machine)
        path = save_finished(finished, run, record, commit)
        logger.info("%s: mean IU %s, recorded in %s", run.name, record.metrics.mean_iu, path)


def collect_results(project_dir: str, study: Study, finished: Path) -> dict[str, Any]:
    """``results.json``'s content, from the finished runs' records (:func:`keep_finished`)."""
    records = {run.name: load_finished(finished, run) for run in study.runs}
    missing = [name for name, record in records.items() if record is None]
    if missing:
        raise RuntimeError(f"{finished}: no record of finished run(s) {missing}")
    formats = sorted({run.params.data.format for run in study.runs})
    return {
        "study": study.name,
        "dataset": formats[0] if len(formats) == 1 else formats,
        "variant": study.spec.variant,
        "seeds": study.spec.seeds,
        "target_val_mean_iu": study.spec.target_val_mean_iu,
        "runs": [record.to_json() for record in records.values() if record],
    }
