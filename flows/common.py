"""What every stage flow shares: parameter loading and task defaults."""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE

from fcn_pipeline.config import Params, load_params

# DVC decides what is stale and caches outputs; Prefect must never skip a task
# on its own cache, so tasks run with caching off.
TASK_DEFAULTS: dict[str, Any] = {"cache_policy": NO_CACHE}


def stage_params(params_file: str, overrides: dict[str, Any] | None) -> Params:
    """Load and validate ``params_file`` with dotted ``overrides`` applied."""
    return load_params(params_file, overrides)
