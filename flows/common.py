"""What the Prefect tasks share: their defaults."""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE

# DVC decides what is stale and caches outputs; Prefect must never skip a task
# on its own cache, so tasks run with caching off.
TASK_DEFAULTS: dict[str, Any] = {"cache_policy": NO_CACHE}
