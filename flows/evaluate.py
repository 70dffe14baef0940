"""The ``evaluate_<variant>`` stages as a Prefect flow."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from fcn_pipeline.config import EvaluateParams
from flows.common import TASK_DEFAULTS, stage_params

# The params.yaml groups this stage reads; dvc.yaml declares the same.
PARAMS = ("evaluate",)


@task(name="evaluate-fcn", **TASK_DEFAULTS)
def evaluate_fcn(params: EvaluateParams, variant: str) -> dict[str, Any]:
    """Score ``variant`` on ``params.split``; write metrics, confusion matrix, overlays."""
    from fcn_pipeline.evaluation import evaluate_variant

    logger = get_run_logger()
    result = evaluate_variant(params, variant, log=logger.info)
    per_class = ", ".join(f"{n}={v:.3f}" for n, v in result.metrics["per_class_iu"].items())
    logger.info("%s per-class IU: %s", variant, per_class)
    logger.info("wrote %s and %s", result.metrics_path, result.out)
    return {"metrics": str(result.metrics_path), "mean_iu": result.metrics["mean_iu"]}


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    variant: str, params_file: str = "params.yaml", overrides: dict[str, Any] | None = None
) -> dict:
    """Run the ``evaluate_<variant>`` stage with ``params_file`` (``evaluate:``)."""
    params = stage_params(params_file, overrides, PARAMS).evaluate
    return evaluate_fcn(params, variant)
