"""What every stage flow shares: parameter loading and task defaults."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prefect.cache_policies import NO_CACHE

from fcn_pipeline.config import load_params

# DVC decides what is stale and caches outputs; Prefect must never skip a task
# on its own cache, so tasks run with caching off.
TASK_DEFAULTS: dict[str, Any] = {"cache_policy": NO_CACHE}


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
