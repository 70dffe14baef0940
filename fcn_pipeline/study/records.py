"""What one run produced: its training curve from DVCLive's TSV files, how soon it
reached a target, and its record in ``results.json``."""

import csv
import io
import math
from typing import Any

from fcn_pipeline.convergence import converged, flat_gain
from fcn_pipeline.study.plan import RunSpec

# --- what one run produced ---------------------------------------------------------


def tsv_column(text: str, column: str) -> list[float]:
    """One column of a DVCLive TSV (``timestamp  step  <metric>``), in step order."""
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
    rows.sort(key=lambda row: int(float(row.get("step") or 0)))
    return [float(row[column]) for row in rows if row.get(column) not in (None, "")]


def training_curve(stages: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Validation mean IU against epochs, images seen and minutes, over the staged trainings.

    ``stages``: per training stage in the order it ran (FCN-32s, -16s, -8s), its
    per-epoch ``train_images``, ``images_per_second`` and ``val_mean_iu``. Epochs,
    images and minutes accumulate across stages, as the paper's Figure 5 counts them.
    "Images" are training samples: patches in patch mode, so only epochs (passes over
    the train split) compare a whole-image run with a patch run.
    """
    images, minutes, val, stage_epochs = [], [], [], []
    seen = spent = 0.0
    for stage in stages:
        stage_epochs.append(len(stage["val_mean_iu"]))
        for count, speed, score in zip(
            stage["train_images"], stage["images_per_second"], stage["val_mean_iu"], strict=False
        ):
            seen += count
            spent += count / max(speed, 1e-9) / 60.0
            images.append(seen)
            minutes.append(spent)
            val.append(score)
    epochs = [float(n) for n in range(1, len(val) + 1)]
    return {
        "epochs": epochs, "images_seen": images, "minutes": minutes, "val_mean_iu": val,
        "stage_epochs": stage_epochs,
    }  # fmt: skip


def scored_curve(curve: dict[str, list]) -> list[float]:
    """The validation curve of the scored net's own training: the last stage's epochs
    (the whole curve for one recorded without ``stage_epochs``)."""
    last = (curve.get("stage_epochs") or [len(curve["val_mean_iu"])])[-1]
    return curve["val_mean_iu"][len(curve["val_mean_iu"]) - last :]


TARGET_UNITS = ("epochs", "images", "minutes")  # of ``to_target``
# The large-object scores compared, by their name in the report: key in ``large_object``.
LARGE_OBJECT_METRICS = {"large_object_mean_iu": "mean_iu", "dominant_class_iu": "dominant_class_iu"}


def to_target(curve: dict[str, list[float]], target: float) -> dict[str, float | None]:
    """Epochs, images (training samples) seen and minutes spent, accumulated over the
    staged trainings, at the first epoch whose validation mean IU is at least
    ``target``; None where no epoch got there. Validation runs once per epoch, so
    this is exact to the epoch."""
    for index, score in enumerate(curve["val_mean_iu"]):
        if score >= target:
            return {
                "epochs": float(index + 1),
                "images": curve["images_seen"][index],
                "minutes": curve["minutes"][index],
            }
    return dict.fromkeys(TARGET_UNITS)


def run_record(
    run: RunSpec,
    metrics: dict[str, Any],
    curve: dict[str, list[float]],
    stages: dict[str, dict[str, Any]] | None = None,
    target: float | None = None,
) -> dict:
    """One entry of ``results.json``'s ``runs`` (metrics as ``metrics/<variant>.json``;
    ``stages``: each staged net's ``metrics/<net>.json`` of the run, scored the same way,
    of which ``stage_mean_iu`` keeps the mean IU; with ``target``, ``to_target`` holds
    the images and minutes until the validation mean IU first reached it)."""
    large = metrics.get("large_object") or {}
    extra = {} if target is None else {"to_target": to_target(curve, target)}
    return {
        "name": run.name,
        "setting": run.setting,
        "setting_name": run.setting_name,
        "seed": run.seed,
        "metrics": {
            **{key: _number(metrics.get(key)) for key in ("mean_iu", "pixel_acc", "mean_acc")},
            "fw_iu": _number(metrics.get("fw_iu")),
            "per_class_iu": {k: _number(v) for k, v in (metrics.get("per_class_iu") or {}).items()},
            "large_object": {
                "images": int(large.get("images") or 0),
                "mean_iu": _number(large.get("mean_iu")),
                "dominant_class_iu": _number(large.get("dominant_class_iu")),
            },
        },
        "stage_mean_iu": {
            net: _number(scores.get("mean_iu")) for net, scores in (stages or {}).items()
        },
        "train_minutes": curve["minutes"][-1] if curve["minutes"] else 0.0,
        "epochs_run": len(curve["val_mean_iu"]),
        "converged": converged(scored_curve(curve)),
        "flat_gain": flat_gain(scored_curve(curve)),
        "flat_gain_all_epochs": flat_gain(curve["val_mean_iu"]),
        **extra,
        "curve": curve,
    }


def _number(value: Any) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)
