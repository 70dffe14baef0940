"""The typed schema of ``params.yaml``: every knob of the pipeline, validated.

``params.yaml`` is grouped by stage (``data:``, ``stats:``, ...). Loading it
checks every key against this schema before any work is done: an unknown key,
a wrong type or an out-of-range value raises :class:`ConfigError` naming the
dotted key (``data.shard_size``) and the offending value.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fcn_pipeline.class_weights import SCHEMES
from fcn_pipeline.errors import ConfigError, is_utf8, printable

Split = Literal["train", "val", "test"]
SourceFormat = Literal["synthetic", "camvid", "voc", "folder"]
Resample = Literal["area", "bilinear"]
SyntheticClass = Literal["background", "bus", "disc", "triangle", "checker", "pole"]
# Class-weighting schemes computed by the stats stage (see fcn_pipeline/class_weights.py).
WeightScheme = Literal[SCHEMES]  # type: ignore[valid-type]
# How the patches stage places patches (see fcn_pipeline/patches.py).
PatchStrategy = Literal["grid", "uniform", "class_balanced"]
# How class_balanced draws a patch centre: a class, then one of its pixels
# (per_class), or a pixel weighted by its class weight (per_pixel).
CentreSampling = Literal["per_class", "per_pixel"]


class StrictModel(BaseModel):
    """Unknown keys are errors, values are never silently coerced across types,
    and no number is infinite or NaN (``.inf`` is no learning rate)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class SyntheticParams(StrictModel):
    """The embedded default dataset: seeded scenes drawn with scikit-image."""

    seed: int = 0
    height: int = Field(96, ge=32, le=4096)
    width: int = Field(128, ge=32, le=4096)
    splits: dict[Split, int] = Field(default_factory=lambda: {"train": 1920, "val": 40, "test": 80})
    classes: list[SyntheticClass] = Field(
        default_factory=lambda: ["background", "bus", "disc", "triangle", "checker", "pole"]
    )
    bus_probability: float = Field(0.5, ge=0.0, le=1.0)
    objects_per_image: tuple[int, int] = (2, 6)
    pole_width: tuple[int, int] = (2, 4)
    noise_std: float = Field(0.04, ge=0.0, le=0.5)

    @field_validator("splits")
    @classmethod
    def _positive_counts(cls, value: dict[str, int]) -> dict[str, int]:
        for split, count in value.items():
            if count < 1:
                raise ValueError(f"split {split!r} needs at least 1 image, got {count}")
        return value

    @field_validator("classes")
    @classmethod
    def _background_first(cls, value: list[str]) -> list[str]:
        if not value or value[0] != "background":
            raise ValueError("the first class must be 'background'")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate class names in {value}")
        if len(value) < 2:
            raise ValueError("at least one object class is needed besides 'background'")
        return value

    @field_validator("objects_per_image", "pole_width")
    @classmethod
    def _ordered_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if not 0 <= low <= high:
            raise ValueError(f"expected [low, high] with 0 <= low <= high, got {list(value)}")
        return value


class FolderParams(StrictModel):
    """Options of the ``folder`` source (``images/``, ``masks/``, ``classes.txt``)."""

    # Used only when the folder has no ``splits/<split>.txt`` lists: each image
    # goes to a split chosen from a hash of its stem, so the split is stable.
    split_fractions: dict[Split, float] = Field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1}
    )

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, value: dict[str, float]) -> dict[str, float]:
        if any(f < 0 for f in value.values()) or not math.isclose(sum(value.values()), 1.0):
            raise ValueError(f"fractions must be >= 0 and sum to 1, got {value}")
        return value


class DataParams(StrictModel):
    """The ``ingest`` stage: which dataset to read and how to shard it."""

    format: SourceFormat = "synthetic"
    root: str | None = None
    out: str = "data/ingested"
    shard_size: int = Field(64, ge=1, le=100_000)
    workers: int = Field(0, ge=0, le=256)
    scale: float = Field(1.0, gt=0.0, le=1.0)  # < 1: every image and mask shrunk at ingest
    resample: Resample = "area"  # the images' filter when scale < 1 (masks: nearest)
    synthetic: SyntheticParams = Field(default_factory=SyntheticParams)
    folder: FolderParams = Field(default_factory=FolderParams)


class StatsParams(StrictModel):
    """The ``stats`` stage: per-class pixel counts and class weights."""

    data: str = "data/ingested"  # derived: data.out (see DERIVED_PATHS)
    out: str = "data/stats"
    workers: int = Field(0, ge=0, le=256)


class PatchesParams(StrictModel):
    """The ``patches`` stage: square training patches cut from the train split."""

    data: str = "data/ingested"  # derived: data.out (see DERIVED_PATHS)
    stats: str = "data/stats"  # derived: stats.out
    out: str = "data/patches"
    strategy: PatchStrategy = "class_balanced"
    class_weighting: WeightScheme = "median_frequency"  # weights behind class_balanced
    centre_sampling: CentreSampling = "per_class"  # class_balanced only
    patch_size: int = Field(32, ge=1, le=4096)
    stride: int = Field(32, ge=1, le=4096)  # grid only
    patches_per_image: int = Field(8, ge=1, le=10_000)  # uniform and class_balanced
    seed: int = Field(0, ge=0)
    shard_size: int = Field(512, ge=1, le=100_000)  # patches per Parquet shard
    workers: int = Field(0, ge=0, le=256)


# The staged FCN variants (FCN-8s may instead be trained at once, see TrainParams.at_once).
StagedVariant = Literal["fcn32s", "fcn16s", "fcn8s"]
STAGED_VARIANTS: tuple[str, ...] = get_args(StagedVariant)
TrainMode = Literal["full", "patch"]
Precision = Literal["auto", "fp32", "bf16"]  # autocast dtype of training steps
# The model choices of fcn_pipeline.models (UPSAMPLE_MODES, GEOMETRIES, NORMS), spelled
# out here so that validating params does not import torch; a test keeps them equal.
UpsampleMode = Literal["learned", "frozen", "interp"]
Geometry = Literal["paper", "same"]
Norm = Literal["none", "batch"]
OptimizerName = Literal["sgd", "adam"]
LrSchedule = Literal["poly", "fixed", "plateau"]
DeviceName = Literal["auto", "cpu", "cuda"]


class TrainParams(StrictModel):
    """The ``train_<variant>`` stages: FCN-32s -> FCN-16s -> FCN-8s, as in the paper."""

    data: str = "data/ingested"  # derived: data.out; val split (and train split, full mode)
    patches: str = "data/patches"  # derived: patches.out; the train set in patch mode
    stats: str = "data/stats"  # derived: stats.out; class weights
    out: str = "models"  # models/<variant>/model.pt and checkpoint.pt
    live: str = "dvclive"  # DVCLive logs, dvclive/<variant>/
    mode: TrainMode = "full"  # full: whole images; patch: the patches stage's patches
    at_once: bool = False  # train@fcn8s trains FCN-8s at once from the backbone
    backbone: Literal["vgg16"] = "vgg16"
    width: float = Field(0.125, gt=0.0, le=1.0)  # channel multiplier; 1.0 = the paper's VGG16
    pretrained: str | None = None  # torchvision VGG16 state dict (width 1.0 only)
    upsample: UpsampleMode = "frozen"
    geometry: Geometry = "same"  # paper: conv1_1 padded by 100, crops; same: no padding
    norm: Norm = "batch"  # batch: BatchNorm after every backbone conv (not in the paper)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # after fc6 and fc7; 0.5 in the paper
    class_weighting: WeightScheme = "none"
    loss_sampling: float = Field(1.0, gt=0.0, le=1.0)  # p: share of coarse cells kept
    sampling_cell: int | None = Field(None, ge=1)  # None = the variant's output stride
    optimizer: OptimizerName = "adam"
    lr: float = Field(8.5e-3, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # sgd only
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: LrSchedule = "poly"
    poly_power: float = Field(0.9, gt=0.0)
    batch_size: int = Field(16, ge=1, le=4096)
    hflip: bool = True  # mirror each training image (and mask) with probability 1/2
    precision: Precision = "auto"  # auto: bf16 on CUDA and on CPUs with native bf16
    preload_mb: int = Field(2048, ge=0)  # decode sets up to this size once, into memory
    # Plateau stop: end a stage when validation mean IU has not beaten its best by
    # plateau_min_gain for plateau_patience epochs (0 = off: run every epoch). With
    # schedule plateau, each of the first plateau_drops plateaus multiplies the lr by
    # plateau_factor instead, and the next one ends the stage.
    plateau_patience: int = Field(0, ge=0)
    plateau_min_gain: float = Field(0.001, ge=0.0, le=1.0)
    plateau_factor: float = Field(0.1, gt=0.0, lt=1.0)
    plateau_drops: int = Field(2, ge=0, le=10)
    val_split: Split = "val"
    eval_batch_size: int = Field(16, ge=1, le=4096)
    device: DeviceName = "auto"
    workers: int = Field(1, ge=-1, le=256)  # DataLoader processes; -1 = cores - 1
    threads: int = Field(0, ge=0, le=256)  # torch CPU threads; 0 = torch's default
    seed: int = Field(0, ge=0)
    # Data-parallel training: processes per machine and machines; batch_size stays the
    # global batch, split evenly over the nproc_per_node * nnodes processes.
    nproc_per_node: int = Field(1, ge=1, le=1024)
    nnodes: int = Field(1, ge=1, le=4096)
    rdzv_endpoint: str = Field("127.0.0.1:29500", pattern=r"^[^\s:]+:\d{1,5}$")  # HOST:PORT
    rdzv_id: str = Field("fcn-pipeline", pattern=r"^[A-Za-z0-9_.-]+$")  # same on every node
    dist_timeout_s: float = Field(300.0, gt=0.0, le=86400.0)  # a dead rank fails others

    @model_validator(mode="after")
    def _batch_splits_over_processes(self) -> TrainParams:
        processes = self.nproc_per_node * self.nnodes
        if self.batch_size % processes:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) is the global batch and must divide "
                f"evenly over train.nproc_per_node * train.nnodes = {processes} processes"
            )
        return self

    @model_validator(mode="after")
    def _plateau_schedule_needs_patience(self) -> TrainParams:
        if self.schedule == "plateau" and self.plateau_patience == 0:
            raise ValueError(
                "train.schedule plateau lowers the lr when validation mean IU stops rising: "
                "it needs train.plateau_patience > 0 (epochs without a gain), got 0"
            )
        return self

    @model_validator(mode="after")
    def _pretrained_needs_full_width(self) -> TrainParams:
        if self.pretrained is not None and self.width != 1.0:
            raise ValueError(
                f"train.pretrained ({self.pretrained!r}) is the full VGG16 and needs "
                f"train.width 1.0, got {self.width}"
            )
        if self.pretrained is not None and self.norm != "none":
            raise ValueError(
                f"train.pretrained ({self.pretrained!r}) is VGG16 without BatchNorm: it needs "
                f"train.norm none, got {self.norm!r}"
            )
        return self


class EpochParams(StrictModel):
    """Epochs of each train stage; its own group so that each stage reruns only when
    its own count changes (``train@fcn8s`` reads ``fcn8s`` for the staged and the
    at-once FCN-8s alike)."""

    fcn32s: int = Field(4, ge=0)
    fcn16s: int = Field(4, ge=0)
    fcn8s: int = Field(32, ge=0)


class EvaluateParams(StrictModel):
    """The ``evaluate_<variant>`` stages: FCN metrics at native resolution."""

    data: str = "data/ingested"  # derived: data.out (see DERIVED_PATHS)
    models: str = "models"  # derived: train.out; models/<variant>/model.pt
    split: Split = "test"
    metrics: str = "metrics"  # metrics/<variant>.json
    out: str = "evaluation"  # evaluation/<variant>/: confusion.csv, confusion.png, overlays/
    overlays: int = Field(4, ge=0, le=1000)  # prediction overlays, images evenly spaced
    batch_size: int = Field(16, ge=1, le=4096)
    device: DeviceName = "auto"
    workers: int = Field(1, ge=-1, le=256)
    threads: int = Field(0, ge=0, le=256)
    # A test image is a "large object" image when one class other than background
    # covers at least this share of its labelled pixels (scored apart: metrics' large_object).
    large_object_share: float = Field(0.5, gt=0.0, le=1.0)


# Where the data stages run their shard calls (see flows/executor.py).
ExecutorKind = Literal["processes", "dask"]


class ExecutorParams(StrictModel):
    """``executor``: where ingest, stats and patches run their per-shard work.

    ``processes``: the local process pool, ``<stage>.workers`` processes.
    ``dask``: one Prefect task per shard on a Dask cluster, the scheduler at
    ``address`` or, when it is null, a LocalCluster of ``workers`` processes
    started for the stage (``<stage>.workers`` is then unused).
    """

    kind: ExecutorKind = "processes"
    address: str | None = None  # e.g. tcp://10.0.0.5:8786; null = start a LocalCluster
    workers: int = Field(0, ge=0, le=256)  # LocalCluster worker processes; 0 = all cores

    @field_validator("address")
    @classmethod
    def _scheduler_address(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c.isspace() for c in value)):
            raise ValueError(f"expected a scheduler address like tcp://host:8786, got {value!r}")
        return value


class Params(StrictModel):
    """All of ``params.yaml``."""

    data: DataParams = Field(default_factory=DataParams)
    stats: StatsParams = Field(default_factory=StatsParams)
    patches: PatchesParams = Field(default_factory=PatchesParams)
    train: TrainParams = Field(default_factory=TrainParams)
    epochs: EpochParams = Field(default_factory=EpochParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    executor: ExecutorParams = Field(default_factory=ExecutorParams)


# What a stage reads from an earlier stage: filled in on load from that stage's output key
# (one home per path: moving the data is one edit of data.out); library callers pass them.
DERIVED_PATHS = {
    "stats.data": "data.out",
    "patches.data": "data.out",
    "patches.stats": "stats.out",
    "train.data": "data.out",
    "train.patches": "patches.out",
    "train.stats": "stats.out",
    "evaluate.data": "data.out",
    "evaluate.models": "train.out",
}


def _derive_paths(source: str, tree: dict[str, Any]) -> None:
    """Refuse a derived path set in ``tree``; fill each from its producer's key."""
    for key, producer in DERIVED_PATHS.items():
        group, name = key.split(".")
        section = tree.get(group)
        if isinstance(section, dict) and name in section:
            raise ConfigError(
                f"{source}: {key}: not a parameter: the stage reads {producer}, the "
                f"output of the stage before it; set {producer} instead"
            )
    for key, producer in DERIVED_PATHS.items():
        group, name = key.split(".")
        source_group, source_name = producer.split(".")
        produced = tree.get(source_group)
        value = produced.get(source_name) if isinstance(produced, dict) else None
        if value is None:
            value = getattr(Params.model_fields[source_group].default_factory(), source_name)
        section = tree.setdefault(group, {})
        if isinstance(section, dict) and isinstance(value, str):  # else its own key fails
            section[name] = value


# A dotted params.yaml key, as `dvc exp run -S key=value` names it.
_KEY = re.compile(r"^[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*$")


def parse_value(text: str) -> Any:
    """A ``-S`` value as DVC reads it: YAML (``0.5`` a float, ``frozen`` a string)."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value``, the one override syntax (DVC's ``-S``: the CLI, the pipeline flow's
    experiments, study files): a dotted params.yaml key and a YAML value. Whether the key
    exists and the value fits is the schema's to say (:func:`load_params`)."""
    key, sep, value = text.partition("=")
    if not sep or not _KEY.match(key):
        raise ConfigError(
            f"{text!r}: expected key=value with a dotted params.yaml key, as in "
            "`dvc exp run -S train.lr=0.001`"
        )
    return key, parse_value(value)


def parse_overrides(texts: list[str]) -> dict[str, Any]:
    """:func:`parse_override` of each, as the ``overrides`` of :func:`load_params`."""
    return dict(parse_override(text) for text in texts)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is not a group of keys")
        node = child
    node[parts[-1]] = value


def _format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid parameters"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif item["type"] == "value_error" and isinstance(item.get("input"), dict):
            # A check across keys: its message names them; the whole section is noise.
            lines.append(f"  {key}: {item['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_params(
    raw: Any, *, source: str = "params", overrides: dict[str, Any] | None = None
) -> Params:
    """Validate a parsed YAML tree (plus dotted ``overrides``) into :class:`Params`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping of stage sections, got {type(raw).__name__}"
        )
    tree = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    for key, value in (overrides or {}).items():
        if isinstance(value, str) and not is_utf8(value):
            raise ConfigError(
                f"{key} (command line): {printable(value)!r} is not valid UTF-8; "
                "rename the file or directory"
            )
        _set_dotted(tree, key, value)
    _derive_paths(source, tree)
    try:
        # Validating in JSON mode keeps strict typing (no "3" -> 3) while
        # letting YAML lists fill tuple fields.
        return Params.model_validate_json(json.dumps(tree))
    except ValidationError as error:
        raise ConfigError(_format_validation_error(source, error)) from None


def load_params(
    path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None
) -> Params:
    """Read and validate ``params.yaml``; raise :class:`ConfigError` naming the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{printable(path)}: parameters file not found") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{printable(path)}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at "
            f"offset {error.start}); write non-ASCII paths in UTF-8"
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_params(raw, source=str(path), overrides=overrides)


def check_staged_variant(variant: str, name: str = "variant") -> None:
    """Raise :class:`ConfigError` unless ``variant`` is one of the staged FCN variants."""
    if variant not in STAGED_VARIANTS:
        raise ConfigError(
            f"{name}: unknown variant {variant!r}; expected one of {', '.join(STAGED_VARIANTS)}"
        )
