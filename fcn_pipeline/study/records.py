"""What one run produced: its training curve from DVCLive's TSV files, how soon it
reached a target, and its record in ``results.json``."""

import csv
import io
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fcn_pipeline.atomic import atomic_write_json
from fcn_pipeline.convergence import converged, flat_gain
from fcn_pipeline.errors import PipelineError
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


@dataclass(frozen=True)
class LargeObject:
    """The scores of the images where one object covers most of the labelled pixels."""

    images: int = 0
    mean_iu: float | None = None
    dominant_class_iu: float | None = None


@dataclass(frozen=True)
class RunMetrics:
    """The scored net's test metrics (``metrics/<variant>.json``, as a study keeps them)."""

    mean_iu: float | None = None
    pixel_acc: float | None = None
    mean_acc: float | None = None
    fw_iu: float | None = None
    per_class_iu: dict[str, float | None] = field(default_factory=dict)
    large_object: LargeObject = field(default_factory=LargeObject)


@dataclass(frozen=True)
class RunRecord:
    """One run of a study: one entry of ``results.json``'s ``runs``. Records written
    before a field existed read it as None (``epochs_run``, ``converged``, ...)."""

    name: str
    setting: dict[str, Any]
    setting_name: str
    seed: int
    metrics: RunMetrics
    curve: dict[str, list]
    stage_mean_iu: dict[str, float | None] = field(default_factory=dict)
    train_minutes: float = 0.0
    epochs_run: int | None = None
    converged: bool | None = None
    flat_gain: float | None = None
    flat_gain_all_epochs: float | None = None
    to_target: dict[str, float | None] | None = None  # only with a study target
    machine: str | None = None  # the CPU (or GPU) it trained on, where recorded
    overrides: list[str] | None = None  # what it ran with, where recorded (a study resumes
    commit: str | None = None  # from results.json only when the overrides are the same)

    def to_json(self) -> dict[str, Any]:
        """The ``results.json`` entry (``to_target`` only when the study has a target)."""
        large = self.metrics.large_object
        extra = {} if self.to_target is None else {"to_target": self.to_target}
        if self.machine is not None:
            extra["machine"] = self.machine
        ran = {}  # records made before runs carried them have none
        if self.overrides is not None:
            ran = {"overrides": self.overrides, "commit": self.commit}
        return {
            "name": self.name, "setting": self.setting, "setting_name": self.setting_name,
            "seed": self.seed, **ran,
            "metrics": {
                "mean_iu": self.metrics.mean_iu, "pixel_acc": self.metrics.pixel_acc,
                "mean_acc": self.metrics.mean_acc, "fw_iu": self.metrics.fw_iu,
                "per_class_iu": self.metrics.per_class_iu,
                "large_object": {"images": large.images, "mean_iu": large.mean_iu,
                                 "dominant_class_iu": large.dominant_class_iu},
            },
            "stage_mean_iu": self.stage_mean_iu, "train_minutes": self.train_minutes,
            "epochs_run": self.epochs_run, "converged": self.converged,
            "flat_gain": self.flat_gain, "flat_gain_all_epochs": self.flat_gain_all_epochs,
            **extra, "curve": self.curve,
        }  # fmt: skip

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> "RunRecord":
        """A ``results.json`` entry, of this version or an earlier one."""
        metrics = entry.get("metrics") or {}
        large = metrics.get("large_object") or {}
        return cls(
            name=entry["name"], setting=entry.get("setting") or {},
            setting_name=entry["setting_name"], seed=entry["seed"],
            metrics=RunMetrics(
                **{k: metrics.get(k) for k in ("mean_iu", "pixel_acc", "mean_acc", "fw_iu")},
                per_class_iu=metrics.get("per_class_iu") or {},
                large_object=LargeObject(int(large.get("images") or 0), large.get("mean_iu"),
                                         large.get("dominant_class_iu")),
            ),
            curve=entry.get("curve") or {}, stage_mean_iu=entry.get("stage_mean_iu") or {},
            train_minutes=entry.get("train_minutes") or 0.0,
            epochs_run=entry.get("epochs_run"), converged=entry.get("converged"),
            flat_gain=entry.get("flat_gain"),
            flat_gain_all_epochs=entry.get("flat_gain_all_epochs"),
            to_target=entry.get("to_target"), machine=entry.get("machine"),
            overrides=entry.get("overrides"), commit=entry.get("commit"),
        )  # fmt: skip


def run_record(
    run: RunSpec,
    metrics: dict[str, Any],
    curve: dict[str, list[float]],
    stages: dict[str, dict[str, Any]] | None = None,
    target: float | None = None,
) -> RunRecord:
    """One run's record (metrics as ``metrics/<variant>.json``; ``stages``: each staged
    net's ``metrics/<net>.json`` of the run, scored the same way, of which
    ``stage_mean_iu`` keeps the mean IU; with ``target``, ``to_target`` holds the
    epochs, images and minutes until the validation mean IU first reached it)."""
    large = metrics.get("large_object") or {}
    return RunRecord(
        name=run.name,
        setting=run.setting,
        setting_name=run.setting_name,
        seed=run.seed,
        metrics=RunMetrics(
            **{
                key: _number(metrics.get(key))
                for key in ("mean_iu", "pixel_acc", "mean_acc", "fw_iu")
            },
            per_class_iu={k: _number(v) for k, v in (metrics.get("per_class_iu") or {}).items()},
            large_object=LargeObject(
                int(large.get("images") or 0),
                _number(large.get("mean_iu")),
                _number(large.get("dominant_class_iu")),
            ),
        ),
        curve=curve,
        stage_mean_iu={
            net: _number(scores.get("mean_iu")) for net, scores in (stages or {}).items()
        },
        train_minutes=curve["minutes"][-1] if curve["minutes"] else 0.0,
        epochs_run=len(curve["val_mean_iu"]),
        converged=converged(scored_curve(curve)),
        flat_gain=flat_gain(scored_curve(curve)),
        flat_gain_all_epochs=flat_gain(curve["val_mean_iu"]),
        to_target=None if target is None else to_target(curve, target),
    )


def _number(value: Any) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


# --- finished runs, kept while a study is under way --------------------------------


def save_finished(directory: str | Path, run: RunSpec, record: RunRecord, commit: str) -> Path:
    """Keep a finished run's record as ``<directory>/<run.name>.json`` (atomically), with
    the overrides it ran with and the commit it ran at: a study resumes from these files
    where the DVC experiments are gone (a fresh clone, another machine)."""
    path = Path(directory) / f"{run.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        path,
        {
            "overrides": run.overrides,
            "commit": commit,
            "record": replace(record, overrides=None, commit=None).to_json(),
        },
    )
    return path


def load_finished(directory: str | Path, run: RunSpec) -> RunRecord | None:
    """The record :func:`save_finished` kept for ``run``; None when there is none or it
    ran with other overrides (the study file changed since: the run runs again). Raises
    :class:`fcn_pipeline.errors.PipelineError` naming a file that is not such a record."""
    path = Path(directory) / f"{run.name}.json"
    if not path.is_file():
        return None
    try:
        kept = json.loads(path.read_text())
        overrides, record = kept["overrides"], RunRecord.from_json(kept["record"])
    except (ValueError, KeyError, TypeError) as error:
        raise PipelineError(
            f"{path}: not a finished run's record ({type(error).__name__}: {error}); "
            "delete it to run that run again"
        ) from None
    if overrides != run.overrides or record.name != run.name:
        return None
    return replace(record, overrides=overrides, commit=kept.get("commit"))


def restore_finished(directory: str | Path, results: str | Path, runs: list[RunSpec]) -> list[str]:
    """Keep in ``directory`` the record of each of ``runs`` that a study's earlier report
    (its ``results.json``) holds with the same overrides and ``directory`` does not: a
    study given more seeds after its report resumes from it, also where the DVC
    experiments are gone. The names restored; entries of reports written before records
    carried their overrides restore nothing. Raises :class:`PipelineError` naming a
    ``results`` that is not a report's."""
    path = Path(results)
    if not path.is_file():
        return []
    try:
        entries = {e["name"]: e for e in json.loads(path.read_text())["runs"]}
        archived = {name: RunRecord.from_json(e) for name, e in entries.items()}
    except (ValueError, KeyError, TypeError) as error:
        raise PipelineError(
            f"{path}: not a study's results.json ({type(error).__name__}: {error})"
        ) from None
    restored = []
    for run in runs:
        record = archived.get(run.name)
        if record is None or record.overrides != run.overrides:
            continue
        if load_finished(directory, run) is None:
            save_finished(directory, run, record, record.commit or "")
            restored.append(run.name)
    return restored
