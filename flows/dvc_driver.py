"""Driving DVC from Python: the command line of a run, running it with its output
streamed, and reading back what it produced (metrics, revision) through DVC's and
git's machine-readable outputs. No Prefect here: :mod:`flows.pipeline` wraps these
functions in tasks.

DVC has no machine-readable report of what ``dvc repro`` ran, so two lines of its
output are read ("Running stage 'X'", "Stage 'X' didn't change, skipping"); a
failed run is attributed to the stage that was running when DVC exited non-zero.
Everything else uses ``--json`` (``dvc metrics show``) or git plumbing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcn_pipeline.config import parse_overrides
from fcn_pipeline.errors import PipelineError

Logger = logging.Logger | logging.LoggerAdapter

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# The only two lines of DVC's prose that are read (it has no --json for repro).
_RUNNING = re.compile(r"^Running stage '([^']+)'")
_SKIPPED = re.compile(r"^Stage '([^']+)' didn't change, skipping")
# A stage command's own report, argparse style: `fcn-pipeline ingest: error: ...`.
_STAGE_REPORT = re.compile(r"^\S+ [\w.-]+: error: ")
# Otherwise: anything that looks like an error or exception line.
_ERROR_LINE = re.compile(r"(\berror\b|\w(Error|Exception)\b)", re.IGNORECASE)


class CommandError(PipelineError):
    """A dvc or git command failed; the message names it, where it ran, its exit status
    and the last line of its stderr."""


def command(
    tool: str, *args: str, cwd: str | Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``dvc <args>`` or ``git <args>`` in ``cwd`` (dvc from this environment), captured;
    with ``check``, :class:`CommandError` when it fails. Every dvc and git call of flows/
    goes through here, except :func:`run_dvc`, which streams."""
    argv = [_executable(tool), *args]
    result = subprocess.run(
        argv, cwd=cwd, env={**subprocess_env(), **(env or {})}, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    if check and result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no error output)"])[-1]
        raise CommandError(
            f"`{tool} {' '.join(args)}` in {cwd} exited with {result.returncode}: {last}"
        )
    return result


def dvc(*args: str, cwd: str | Path, check: bool = True) -> str:
    """``dvc <args>``'s stdout (:func:`command`)."""
    return command("dvc", *args, cwd=cwd, check=check).stdout


def dvc_json(*args: str, cwd: str | Path) -> Any:
    """``dvc <args> --json``, parsed."""
    return json.loads(dvc(*args, "--json", cwd=cwd) or "null")


def git(*args: str, cwd: str | Path, check: bool = True) -> str:
    """``git <args>``'s stdout (:func:`command`)."""
    return command("git", *args, cwd=cwd, check=check).stdout


class DvcStageError(RuntimeError):
    """DVC exited non-zero; the message names the stage(s) and their error lines."""

    def __init__(self, message: str, stages: list[str]):
        super().__init__(message)
        self.stages = stages


@dataclass
class DvcRun:
    """What one ``dvc repro`` / ``dvc exp run`` did, read from its output."""

    command: list[str]
    returncode: int = 0
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    experiment: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "returncode": self.returncode,
            "ran": self.ran,
            "skipped": self.skipped,
            "failed": self.failed,
            "experiment": self.experiment,
        }


def dvc_command(
    targets: list[str], overrides: list[str], experiment: bool, experiment_name: str | None
) -> list[str]:
    """The DVC command line for a run (without the ``dvc`` executable)."""
    parse_overrides(overrides)  # the one key=value syntax; raises ConfigError naming it
    if not experiment:
        if overrides or experiment_name:
            raise ValueError(
                "overrides and experiment_name need an experiment: run the "
                "'fcn-pipeline/experiment' deployment (`dvc exp run`), or pass experiment=true"
            )
        return ["repro", *targets]
    command = ["exp", "run"]
    for override in overrides:
        command += ["-S", override]
    if experiment_name:
        command += ["--name", experiment_name]
    return [*command, *targets]


def _executable(name: str) -> str:
    """``name`` from this interpreter's environment (the project venv), else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def subprocess_env() -> dict[str, str]:
    """Environment for DVC and the stage commands it starts.

    PREFECT_API_URL (and every other PREFECT_* setting) passes through so the
    stage flow runs land on the same server. The ``PREFECT__*`` variables that
    tie *this* process to its flow run (run id, control port) are dropped: a
    stage is its own flow run, never a second copy of this one.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT__")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _stage_error_lines(section: list[str]) -> list[str]:
    """What a failed stage said went wrong: its error report with the indented detail lines.

    The stage commands report ``fcn-pipeline <stage>: error: <message>`` with
    one indented line per offending file; without such a report, any line
    that looks like an error. Falls back to the last lines of the output.
    """
    for pattern in (_STAGE_REPORT, _ERROR_LINE):
        picked: list[str] = []
        keep_details = False
        for line in section:
            if pattern.search(line):
                picked.append(line)
                keep_details = True
            elif keep_details and line.startswith((" ", "\t")):
                picked.append(line)
            else:
                keep_details = False
        if picked:
            return picked[-40:]
    return section[-20:]


def run_dvc(
    command: list[str], project_dir: str, logger: Logger, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``dvc <command>`` in ``project_dir``, streaming its output into ``logger``
    (``env``: variables set on top of :func:`subprocess_env`).

    Raises :class:`DvcStageError` naming the failing stage (the one running when
    DVC exited non-zero) and its error lines. Returns :meth:`DvcRun.as_dict`.
    """
    argv = [_executable("dvc"), *command]
    logger.info("$ dvc %s   (in %s)", " ".join(command), project_dir)
    run = DvcRun(command=["dvc", *command])
    section: list[str] = []  # output of the stage running now
    tail: deque[str] = deque(maxlen=40)
    dvc_errors: list[str] = []
    with subprocess.Popen(
        argv,
        cwd=project_dir,
        env={**subprocess_env(), **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    ) as process:
        assert process.stdout is not None
        for raw in process.stdout:
            line = _ANSI.sub("", raw).rstrip()
            if not line:
                continue
            tail.append(line)
            if match := _RUNNING.match(line):
                run.ran.append(match.group(1))
                section = []
            elif match := _SKIPPED.match(line):
                run.skipped.append(match.group(1))
            else:
                section.append(line)
            if line.startswith("ERROR"):
                dvc_errors.append(line)
                logger.error("%s", line)
            elif line.startswith("WARNING"):
                logger.warning("%s", line)
            else:
                logger.info("%s", line)
        run.returncode = process.wait()

    if run.returncode == 0:
        logger.info(
            "dvc finished: ran %s; unchanged %s", run.ran or "nothing", run.skipped or "none"
        )
        return run.as_dict()

    if run.ran:
        run.failed = [run.ran[-1]]  # DVC stops at the first stage that fails
    command_line = f"`{' '.join(run.command)}` exited with {run.returncode}"
    if run.failed:
        names = ", ".join(f"'{stage}'" for stage in run.failed)
        stage_lines = [line for line in _stage_error_lines(section) if line not in dvc_errors]
        lines = [f"DVC stage {names} failed: {command_line}", *dvc_errors]
        lines += ["stage output:", *stage_lines] if stage_lines else []
    else:
        lines = [f"DVC failed before running any stage: {command_line}", *(dvc_errors or tail)]
    raise DvcStageError("\n".join(lines), run.failed)


def back_up_uncached_outputs(project_dir: str, backup_dir: str) -> list[str]:
    """Copy the outputs DVC does not cache (metrics, DVCLive curves) into ``backup_dir``.

    DVC deletes a stage's outputs before running it and can restore only the
    cached ones (``dvc checkout``); these copies let a failed run put the
    others back too. Persistent outputs (training checkpoints) are never
    deleted by DVC and are skipped. Returns the copied paths, relative to the
    project.
    """
    from dvc.repo import Repo  # imported here: `prefect deploy` loads flows.pipeline

    copied = []
    with Repo(project_dir) as repo:
        for out in repo.index.outs:
            source = Path(out.fs_path)
            if out.use_cache or out.persist or not source.exists():
                continue
            relative = source.relative_to(project_dir)
            target = Path(backup_dir, relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, symlinks=True)
            else:
                shutil.copy2(source, target)
            copied.append(str(relative))
    return copied


def restore_workspace(
    project_dir: str,
    params_files: dict[str, bytes],
    backup_dir: str,
    uncached: list[str],
    logger: Logger,
) -> None:
    """Put the workspace back as it was before a failed run.

    The params files an experiment's ``-S`` rewrote get their previous bytes
    back; uncached outputs DVC deleted come back from ``backup_dir``; then
    ``dvc checkout`` restores the cached outputs ``dvc.lock`` records from the
    DVC cache. (``dvc.lock`` is only written for stages that succeeded, so it
    still describes the last good outputs of the failed one.)
    """
    for name, content in params_files.items():
        path = Path(project_dir, name)
        if not path.is_file() or path.read_bytes() != content:
            path.write_bytes(content)
            logger.info("restored %s", name)
    for relative in uncached:
        target, copy = Path(project_dir, relative), Path(backup_dir, relative)
        if not target.exists():  # deleted by DVC for the stage that failed
            target.parent.mkdir(parents=True, exist_ok=True)
            if copy.is_dir():
                shutil.copytree(copy, target, symlinks=True)
            else:
                shutil.copy2(copy, target)
            logger.info("restored %s", relative)
    result = command("dvc", "checkout", cwd=project_dir, check=False)
    output = (result.stdout + result.stderr).strip()
    if result.returncode == 0:
        logger.info("restored the outputs dvc.lock records from the DVC cache\n%s", output)
    else:
        logger.warning("dvc checkout could not restore every output:\n%s", output)


def params_files(project_dir: str, overrides: list[str]) -> dict[str, bytes]:
    """Current bytes of the params files ``dvc exp run -S`` will rewrite."""
    names = {"params.yaml"}
    for override in overrides:
        key = override.split("=", 1)[0]
        if ":" in key:  # `other.yaml:key=value`
            names.add(key.split(":", 1)[0])
    paths = {name: Path(project_dir, name) for name in sorted(names)}
    return {name: path.read_bytes() for name, path in paths.items() if path.is_file()}


def read_metrics(project_dir: str, logger: Logger) -> dict[str, dict[str, Any]]:
    """``dvc metrics show --json`` of the workspace, as ``{metrics file: {metric: value}}``.

    Nested keys are flattened with dots (``per_class_iu.pole``). Files DVC
    declares but could not read (not produced yet) are logged and left out.
    """
    revisions = dvc_json("metrics", "show", cwd=project_dir) or {}
    workspace = revisions.get("workspace", revisions.get("", {}))
    files: dict[str, dict[str, Any]] = {}
    for path, entry in (workspace.get("data") or {}).items():  # dvc.yaml order
        if "error" in entry:
            logger.warning("metrics file %s: %s", path, entry["error"].get("msg", entry["error"]))
            continue
        files[path] = _flatten(entry.get("data") or {})
    logger.info("DVC reports metrics in %s", sorted(files) or "no file yet")
    return files


def read_metrics_diff(project_dir: str) -> dict[str, dict[str, Any]]:
    """``dvc metrics diff --json`` (the committed metrics against the workspace's), as
    ``{metrics file: {metric: {"old": ..., "new": ..., "diff": ...}}}``: changed ones only."""
    changed: dict[str, dict[str, Any]] = {}
    for path, metrics in (dvc_json("metrics", "diff", cwd=project_dir) or {}).items():
        if flat := _diff_leaves(metrics or {}):
            changed[path] = flat
    return changed


def _diff_leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": {"old": 1, "new": 2, "diff": 1}}}`` -> ``{"a.b": {"old": 1, ...}}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and {"old", "new"} & set(value):
            flat[f"{prefix}{key}"] = value
        elif isinstance(value, dict):
            flat.update(_diff_leaves(value, f"{prefix}{key}."))
    return flat


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_revision(project_dir: str, experiment: str | None) -> dict[str, str | None]:
    """The git commit the workspace is based on and, for an experiment, its name and ref sha."""
    revision: dict[str, str | None] = {
        "commit": git("rev-parse", "HEAD", cwd=project_dir).strip(),
        "experiment": experiment,
        "experiment_sha": None,
    }
    if experiment:
        # DVC keeps each experiment as refs/exps/<baseline sha>/<name>.
        refs = git("for-each-ref", "--format=%(objectname) %(refname)", "refs/exps",
                   cwd=project_dir)  # fmt: skip
        for line in refs.splitlines():
            sha, ref = line.split(" ", 1)
            if ref.rsplit("/", 1)[-1] == experiment:
                revision["experiment_sha"] = sha
    return revision
