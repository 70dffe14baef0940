"""The pipeline's stages as plain programs: what ``fcn-pipeline <stage>`` runs.

Each stage is a module ``flows/<stage>.py`` with ``PARAMS``, the params groups its
``dvc.yaml`` stage declares, and ``run(params, variant, report)``, which calls the
library and tells a :class:`Report` what it did; this module is what they share.
Nothing here imports Prefect: under ``dvc repro`` or ``dvc exp run`` a stage is a plain process
that logs to stderr. When DVC itself runs under the pipeline or study flow,
:mod:`flows.stage_runs` runs the same function as a child flow run of that flow run,
with a report that also publishes Prefect artifacts.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from fcn_pipeline.config import load_params

LOG_FORMAT = "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"
# Set by the pipeline and study flows for the DVC they run: the id of the flow run
# whose children the stages' runs become (flows.stage_runs).
PARENT_ENV = "FCN_PREFECT_PARENT"


class Report:
    """Where a stage says what it did. This one logs to stderr and keeps no artifacts;
    :class:`flows.stage_runs.RunReport` logs to the flow run and publishes them."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(f"fcn-pipeline.{name}")
        if not self.logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
            self.logger.addHandler(handler)
            self.logger.setLevel(logging.INFO)
            self.logger.propagate = False

    def info(self, message: str, *args: Any) -> None:
        self.logger.info(message, *args)

    def warning(self, message: str, *args: Any) -> None:
        self.logger.warning(message, *args)

    def progress(self, key: str, done: int, total: int, description: str) -> None:
        """``done`` of ``total`` steps of what ``key`` names (training epochs)."""

    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None:
        """A result as rows of one table (the per-variant metrics, per-class IU)."""

    def link(self, key: str, path: str | Path, description: str) -> None:
        """A file or directory the stage wrote."""


def error_message(error: BaseException) -> str:
    """What a stage's one ``error:`` line says: a foreseen error's own message (which
    names the file or key), else the exception's type and its message's first line."""
    from fcn_pipeline.errors import PipelineError

    if isinstance(error, PipelineError):
        return str(error)
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line}"


def stage_params(
    params_file: str, overrides: dict[str, Any] | None, sections: tuple[str, ...]
) -> SimpleNamespace:
    """Load and validate ``params_file`` with dotted ``overrides`` applied, and hand the
    stage only the ``sections`` (top-level groups) that its ``dvc.yaml`` stage declares:
    reading any other group raises AttributeError, so a stage cannot depend on a
    parameter that DVC does not track for it (tests/test_stage_params.py checks that
    each stage's ``sections`` match ``dvc.yaml``)."""
    params = load_params(params_file, overrides)
    return SimpleNamespace(**{name: getattr(params, name) for name in sections})


def stage_module(stage: str) -> ModuleType:
    """``flows.<stage>``: the stage's ``PARAMS`` and ``run(params, variant, report)``
    (dvc.yaml lists that file among the stage's deps)."""
    return importlib.import_module(f"flows.{stage}")


def label(stage: str, variant: str | None) -> str:
    """``train@fcn8s``: the stage's name in dvc.yaml."""
    return f"{stage}@{variant}" if variant else stage


def needs_flow_run(params: SimpleNamespace) -> bool:
    """Whether a stage with ``params`` must run inside a Prefect flow run even when no
    pipeline or study run is its parent: only the data stages on Dask (one task per
    shard, :mod:`flows.executor`)."""
    executor = getattr(params, "executor", None)
    return executor is not None and executor.kind == "dask"


def run_stage(
    stage: str, variant: str | None, params: SimpleNamespace, report: Report | None = None
) -> dict[str, Any]:
    """Run ``stage`` (for ``variant``) with ``params`` (:func:`stage_params`' groups)."""
    return stage_module(stage).run(params, variant, report or Report(label(stage, variant)))
