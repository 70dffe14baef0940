"""The ``evaluate@<variant>`` stages: the paper's metrics of one trained variant."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flows.stages import Report

# The params.yaml groups this stage reads; dvc.yaml declares the same.
PARAMS = ("evaluate",)

FCN_SCORES = ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")


def run(params: SimpleNamespace, variant: str | None, report: Report) -> dict[str, Any]:
    """Score ``variant`` on ``evaluate.split``; write metrics, confusion matrix, overlays."""
    from fcn_pipeline.evaluation import evaluate_variant

    assert variant is not None
    result = evaluate_variant(params.evaluate, variant, log=report.info)
    per_class = result.metrics["per_class_iu"]
    report.info("%s per-class IU: %s", variant,
                ", ".join(f"{n}={v:.3f}" for n, v in per_class.items()))  # fmt: skip
    report.info("wrote %s and %s", result.metrics_path, result.out)
    split = params.evaluate.split
    report.table(
        f"{variant}-metrics",
        [{"metric": k, "value": round(result.metrics[k], 4)} for k in FCN_SCORES],
        f"{variant} on the {split} split: the paper's four scores",
    )
    report.table(
        f"{variant}-per-class-iu",
        [{"class": n, "iu": None if v is None else round(v, 4)} for n, v in per_class.items()],
        f"{variant} on the {split} split: IU per class",
    )
    report.link(f"{variant}-confusion", Path(result.out) / "confusion.csv",
                f"{variant}: confusion matrix (rows: truth, columns: prediction)")  # fmt: skip
    report.link(f"{variant}-overlays", result.out, f"{variant}: overlays and plots")
    return {"metrics": str(result.metrics_path), "mean_iu": result.metrics["mean_iu"]}
