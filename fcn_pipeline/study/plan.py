"""A study file's schema, its checks against ``params.yaml``, and the run plan:
every (setting, seed) one run with its overrides."""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from fcn_pipeline.config import (
    Params,
    StagedVariant,
    StrictModel,
    _format_validation_error,
    parse_override,
    parse_overrides,
    parse_params,
)
from fcn_pipeline.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # usable in a git ref (experiment name)
STAGED = ("fcn32s", "fcn16s", "fcn8s")  # the order training runs (curves are joined)


def _check_overrides(values: list[str]) -> list[str]:
    for item in values:
        try:
            parse_override(item)
        except ConfigError as error:
            raise ValueError(str(error)) from None
    return values


class StudyFile(StrictModel):
    """The schema of ``studies/<name>.yaml``; unknown keys are refused."""

    study: str | None = None  # default: the file's stem
    description: str = ""
    base: list[str] = Field(default_factory=list)
    settings: dict[str, list[str]] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    # More seeds for some settings (a comparison that three seeds leave undecided):
    # {setting: [seed, ...]}, each seed new to that setting.
    extra_seeds: dict[str, list[int]] = Field(default_factory=dict)
    seed_keys: list[str] = Field(default_factory=lambda: ["train.seed"], min_length=1)
    variant: StagedVariant = "fcn8s"  # whose metrics the study compares
    large_object_share: float = Field(0.5, gt=0.0, le=1.0)  # sets evaluate.large_object_share
    # The validation mean IU whose first crossing is reported per run (images seen and
    # minutes until then, the paper's time-to-accuracy); null: not reported.
    target_val_mean_iu: float | None = Field(None, gt=0.0, le=1.0)
    comparisons: list[tuple[str, str]] | None = None

    @field_validator("study")
    @classmethod
    def _study_name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError(f"{value!r}: use letters, digits, '-' and '_'")
        return value

    @field_validator("base")
    @classmethod
    def _base(cls, value: list[str]) -> list[str]:
        return _check_overrides(value)

    @field_validator("settings")
    @classmethod
    def _settings(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, overrides in value.items():
            if not _NAME.match(name):
                raise ValueError(f"setting {name!r}: use letters, digits, '-' and '_'")
            _check_overrides(overrides)
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or min(value) < 0:
            raise ValueError(f"seeds must be distinct and >= 0, got {value}")
        return value


@dataclass(frozen=True)
class RunSpec:
    """One (setting, seed) of a study: a named DVC experiment."""

    name: str
    setting_name: str
    setting: dict[str, Any]  # the setting's own overrides, parsed
    seed: int
    overrides: list[str]  # every -S of the run: base, setting, seed, threshold
    params: Params  # params.yaml with ``overrides`` applied
    variant: str = "fcn8s"  # whose metrics the study reads

    @property
    def metrics_path(self) -> str:
        """The run's ``metrics/<variant>.json`` (as ``dvc exp show`` names it)."""
        return f"{self.params.evaluate.metrics}/{self.variant}.json"

    def curve_path(self, variant: str, metric: str) -> str:
        """A DVCLive per-epoch TSV of the run (committed in its experiment)."""
        return f"{self.params.train.live}/{variant}/plots/metrics/{metric}.tsv"


@dataclass(frozen=True)
class Study:
    """A checked study file and its runs, in order (setting by setting, seed by seed)."""

    name: str
    source: str
    spec: StudyFile
    runs: list[RunSpec]

    @property
    def comparisons(self) -> list[tuple[str, str]]:
        if self.spec.comparisons is not None:
            return list(self.spec.comparisons)
        names = list(self.spec.settings)
        return [(names[0], other) for other in names[1:]]


def _has_key(tree: Any, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def load_study(path: str | Path, params_path: str | Path = "params.yaml") -> Study:
    """Read, validate and plan ``path`` against ``params_path``.

    Raises :class:`ConfigError` naming the study file and the key: an unknown
    study-file key, a ``key=value`` whose key ``params.yaml`` does not have, a
    value the params schema refuses, or a comparison of an unknown setting.
    Nothing is run; call it before any experiment starts.
    """
    path, source = Path(path), str(path)
    try:
        raw = yaml.safe_load(path.read_text())
        params_raw = yaml.safe_load(Path(params_path).read_text()) or {}
    except FileNotFoundError as error:
        raise ConfigError(f"{error.filename}: file not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping (study, base, settings, seeds)")
    try:
        spec = StudyFile.model_validate_json(json.dumps(raw))
    except ValidationError as error:
        raise ConfigError(_format_validation_error(source, error)) from None
    name = spec.study or path.stem
    if not _NAME.match(name):
        raise ConfigError(f"{source}: study name {name!r}: use letters, digits, '-' and '_'")
    keyed = [("base", o) for o in spec.base] + [("seed_keys", f"{k}=0") for k in spec.seed_keys]
    keyed += [(f"settings.{s}", o) for s, overrides in spec.settings.items() for o in overrides]
    for where, override in keyed:
        key = override.split("=", 1)[0]
        if not _has_key(params_raw, key):
            raise ConfigError(f"{source}: {where}: {key!r} is not a key of {params_path}")
    for setting, extra in spec.extra_seeds.items():
        if setting not in spec.settings:
            raise ConfigError(f"{source}: extra_seeds: unknown setting {setting!r}")
        if (
            len(set(extra)) != len(extra)
            or set(extra) & set(spec.seeds)
            or min(extra, default=0) < 0
        ):
            raise ConfigError(
                f"{source}: extra_seeds.{setting}: {extra}: seeds must be distinct, >= 0 and "
                f"not already in seeds {spec.seeds}"
            )
    for pair in spec.comparisons or []:
        unknown = [s for s in pair if s not in spec.settings]
        if unknown:
            raise ConfigError(f"{source}: comparisons: unknown setting(s) {unknown}")
    runs = [
        _plan_run(name, setting, seed, spec, params_raw, source)
        for setting in spec.settings
        for seed in [*spec.seeds, *spec.extra_seeds.get(setting, [])]
    ]
    return Study(name=name, source=source, spec=spec, runs=runs)


def _plan_run(
    study: str, setting: str, seed: int, spec: StudyFile, params_raw: dict, source: str
) -> RunSpec:
    overrides = [*spec.base, *spec.settings[setting]]
    overrides += [f"{key}={seed}" for key in spec.seed_keys]
    overrides.append(f"evaluate.large_object_share={spec.large_object_share}")
    params = parse_params(
        params_raw, source=f"{source} (setting {setting}, seed {seed})",
        overrides=parse_overrides(overrides),
    )  # fmt: skip
    return RunSpec(
        name=f"{study}-{setting}-s{seed}",
        setting_name=setting,
        setting=parse_overrides(spec.settings[setting]),
        seed=seed,
        overrides=overrides,
        params=params,
        variant=spec.variant,
    )
