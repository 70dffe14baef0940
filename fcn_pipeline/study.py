"""Studies: several settings of the pipeline, each trained with several seeds, compared.

A study file (``studies/<name>.yaml``) names a base (overrides of ``params.yaml``
applied to every run), settings (each a set of ``key=value`` overrides, as
``dvc exp run -S`` takes them) and seeds. Every (setting, seed) is one run; the
DVC driving lives in :mod:`flows.study_driver`. This module is the pure part:
the study file's schema and its checks against ``params.yaml``, the run plan,
training curves from DVCLive's TSV files, the aggregation over seeds, Welch's
t-test, and the report (``results.json``, ``report.md``, PNG plots).

Example::

    study: upsample            # optional; default: the file name without .yaml
    base: [epochs.fcn8s=10]    # every run
    settings:
      frozen: [train.upsample=frozen]
      interp: [train.upsample=interp]
    seeds: [0, 1, 2]           # each sets every key in seed_keys (default train.seed)
    comparisons: [[frozen, interp]]   # default: every setting against the first
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import Field, ValidationError, field_validator

from fcn_pipeline.atomic import atomic_output_dir
from fcn_pipeline.config import (
    Params,
    StagedVariant,
    StrictModel,
    _format_validation_error,
    parse_override,
    parse_overrides,
    parse_params,
)
from fcn_pipeline.convergence import FLAT_RULE, converged, flat_gain
from fcn_pipeline.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # usable in a git ref (experiment name)
STAGED = ("fcn32s", "fcn16s", "fcn8s")  # the order training runs (curves are joined)
ALPHA = 0.05  # two-sided significance level of the comparisons
TEST_NAME = "Welch's two-sample t-test (unequal variances), two-sided"


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
    for pair in spec.comparisons or []:
        unknown = [s for s in pair if s not in spec.settings]
        if unknown:
            raise ConfigError(f"{source}: comparisons: unknown setting(s) {unknown}")
    runs = [
        _plan_run(name, setting, seed, spec, params_raw, source)
        for setting in spec.settings
        for seed in spec.seeds
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
    images, minutes, val = [], [], []
    seen = spent = 0.0
    for stage in stages:
        for count, speed, score in zip(
            stage["train_images"], stage["images_per_second"], stage["val_mean_iu"], strict=False
        ):
            seen += count
            spent += count / max(speed, 1e-9) / 60.0
            images.append(seen)
            minutes.append(spent)
            val.append(score)
    epochs = [float(n) for n in range(1, len(val) + 1)]
    return {"epochs": epochs, "images_seen": images, "minutes": minutes, "val_mean_iu": val}


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
        "converged": converged(curve["val_mean_iu"]),
        "flat_gain": flat_gain(curve["val_mean_iu"]),
        **extra,
        "curve": curve,
    }


def _number(value: Any) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


# --- statistics ----------------------------------------------------------------------


def mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (ddof 1) and count of the non-missing values."""
    kept = np.array([v for v in values if v is not None], dtype=np.float64)
    if kept.size == 0:
        return None, None, 0
    std = float(kept.std(ddof=1)) if kept.size > 1 else None
    return float(kept.mean()), std, int(kept.size)


def welch_t_test(a: list[float], b: list[float]) -> dict[str, float | None]:
    """Welch's t statistic, Welch-Satterthwaite degrees of freedom, two-sided p
    (``scipy.stats.ttest_ind(equal_var=False)``) and the 95 % confidence interval of
    ``mean(a) - mean(b)`` (``ci_low``, ``ci_high``).

    Undefined (all None) with fewer than two values on a side or no spread at all on
    both: a test of two constant groups says nothing, not p = 0.
    """
    from scipy import stats

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    undefined = {"t": None, "df": None, "p": None, "ci_low": None, "ci_high": None}
    if x.size < 2 or y.size < 2 or x.var(ddof=1) + y.var(ddof=1) == 0.0:
        return undefined
    with warnings.catch_warnings():  # near-equal values: scipy warns, the test stands
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(x, y, equal_var=False)
        low, high = result.confidence_interval(0.95)
    return {"t": float(result.statistic), "df": float(result.df), "p": float(result.pvalue),
            "ci_low": float(low), "ci_high": float(high)}  # fmt: skip


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p values (None stays None): the
    k-th smallest of m is multiplied by m - k + 1, kept monotone and capped at 1."""
    ranked = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for k, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - k) * p))
        adjusted[i] = running
    return adjusted


def aggregate(runs: list[dict], settings: list[str]) -> dict[str, dict[str, Any]]:
    """Per setting: mean, std and count over its seeds of mean IU, per-class IU, the
    large-object scores and training minutes (each as ``[mean, std, n]``)."""
    summary: dict[str, dict[str, Any]] = {}
    for setting in settings:
        mine = [r for r in runs if r["setting_name"] == setting]
        metrics = [r["metrics"] for r in mine]
        classes = list(dict.fromkeys(c for m in metrics for c in m["per_class_iu"]))
        summary[setting] = {
            "seeds": [r["seed"] for r in mine],
            "mean_iu": mean_std([m["mean_iu"] for m in metrics]),
            "pixel_acc": mean_std([m["pixel_acc"] for m in metrics]),
            "mean_acc": mean_std([m["mean_acc"] for m in metrics]),
            "per_class_iu": {
                c: mean_std([m["per_class_iu"].get(c) for m in metrics]) for c in classes
            },
            "large_object_images": mean_std([m["large_object"]["images"] for m in metrics]),
            "large_object_mean_iu": mean_std([m["large_object"]["mean_iu"] for m in metrics]),
            "dominant_class_iu": mean_std(
                [m["large_object"]["dominant_class_iu"] for m in metrics]
            ),
            "train_minutes": mean_std([r["train_minutes"] for r in mine]),
            "epochs_run": mean_std([r.get("epochs_run") for r in mine]),
            "converged": sum(bool(r.get("converged")) for r in mine),
            **{
                f"{unit}_to_target": mean_std([(r.get("to_target") or {}).get(unit) for r in mine])
                for unit in TARGET_UNITS
                if any("to_target" in r for r in mine)
            },
            "stage_mean_iu": {
                net: mean_std([r.get("stage_mean_iu", {}).get(net) for r in mine])
                for net in dict.fromkeys(n for r in mine for n in r.get("stage_mean_iu", {}))
            },
        }
    return summary


def run_value(run: dict, metric: str = "mean_iu", stage: str | None = None) -> float | None:
    """One run's number: ``metrics[metric]``, a staged net's mean IU (``stage``), or
    ``<unit>_to_target`` (a :data:`TARGET_UNITS` unit)."""
    if stage is not None:
        return run.get("stage_mean_iu", {}).get(stage)
    if metric.endswith("_to_target"):
        return (run.get("to_target") or {}).get(metric.removesuffix("_to_target"))
    if metric in LARGE_OBJECT_METRICS:
        return (run["metrics"].get("large_object") or {}).get(LARGE_OBJECT_METRICS[metric])
    return run["metrics"][metric]


def compare(
    runs: list[dict],
    pairs: list[tuple[str, str]],
    metric: str = "mean_iu",
    stage: str | None = None,
) -> list[dict]:
    """Each pair's difference of ``metric`` (first minus second) and Welch's test of it;
    with ``stage``, of that staged net's mean IU (``stage_mean_iu``) instead. A run
    without a value (a class absent, a target never reached) is left out; for the
    ``*_to_target`` metrics a pair is tested only when every run has one (a run that
    never got there is not a fast one), else ``p`` is None."""
    out = []
    for first, second in pairs:
        every = [
            [run_value(r, metric, stage) for r in runs if r["setting_name"] == s]
            for s in (first, second)
        ]
        values = [[v for v in side if v is not None] for side in every]
        if metric.endswith("_to_target") and any(None in side for side in every):
            values, test = [[], []], welch_t_test([], [])
        else:
            test = welch_t_test(*values)
        diff = float(np.mean(values[0]) - np.mean(values[1])) if all(values) else None
        name = f"{stage} mean_iu" if stage is not None else metric
        unconverged = sum(
            not r.get("converged", False) for r in runs if r["setting_name"] in (first, second)
        )
        out.append({"a": first, "b": second, "metric": name, "difference": diff, **test,
                    "unconverged_runs": unconverged})  # fmt: skip
    return with_holm(out)


def with_holm(family: list[dict]) -> list[dict]:
    """``family``'s rows with ``p_holm`` (Holm over the family) and
    ``exceeds_seed_spread`` (``p_holm`` < :data:`ALPHA`)."""
    for row, adjusted in zip(family, holm([row["p"] for row in family]), strict=True):
        row["p_holm"] = adjusted
        row["exceeds_seed_spread"] = adjusted is not None and adjusted < ALPHA
    return family


def compare_classes(runs: list[dict], pairs: list[tuple[str, str]]) -> list[dict]:
    """Per-class IU of each pair, one family over every (class, pair) for Holm's
    adjustment (a run where the class is absent is left out)."""
    classes = list(dict.fromkeys(c for r in runs for c in r["metrics"]["per_class_iu"]))
    family = []
    for name in classes:
        per_class = [
            {**r, "metrics": {**r["metrics"], "class_iu": r["metrics"]["per_class_iu"].get(name)}}
            for r in runs
        ]
        for row in compare(per_class, pairs, "class_iu"):
            family.append({**row, "metric": f"IU {name}"})
    return with_holm(family)


# --- the report ----------------------------------------------------------------------


def _pm(stat: tuple[float | None, float | None, int] | list, digits: int = 4) -> str:
    mean, std, _ = stat
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def comparison_table(rows: list[dict]) -> list[str]:
    """Markdown rows of :func:`compare`'s output."""
    lines = ["| a | b | metric | a - b | 95 % CI | t | df | p | p (Holm) | detected |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in rows:
        digits = 2 if c["metric"] == "epochs_to_target" else 4
        interval = (f"[{_fmt(c['ci_low'], digits)}, {_fmt(c['ci_high'], digits)}]"
                    if c.get("ci_low") is not None else "-")  # fmt: skip
        cells = [_fmt(c["difference"], digits), interval, _fmt(c["t"], 3), _fmt(c["df"], 1),
                 _fmt(c["p"], 4), _fmt(c.get("p_holm"), 4)]  # fmt: skip
        verdict = "yes" if c["exceeds_seed_spread"] else "no"
        if c["p"] is None and c["metric"].endswith("_to_target"):
            verdict = "n/a (a run never reached the target)"
        elif c["p"] is None:
            verdict = "n/a (< 2 seeds or no spread)"
        if c.get("unconverged_runs"):
            verdict += f" (*unconverged*: {c['unconverged_runs']} runs)"
        lines.append(f"| {c['a']} | {c['b']} | {c['metric']} | {' | '.join(cells)} | {verdict} |")
    return lines


def report_markdown(
    results: dict, summary: dict, comparisons: list[dict], per_class: list[dict] | None = None
) -> str:
    """``report.md``: per setting mean ± std over seeds, per-class IU, the comparisons."""
    settings = list(summary)
    lines = [f"# Study `{results['study']}`", ""]
    lines += [f"- dataset: {results['dataset']}; variant scored: {results['variant']}"]
    lines += [f"- runs: {len(results['runs'])} ({len(settings)} settings x seeds)"]
    lines += ["- ± is the sample standard deviation over seeds (n - 1)"]
    lines += [f"- converged: {FLAT_RULE}", ""]
    lines += ["| setting | overrides | seeds | mean IU | pixel acc. | mean (class) acc. "
              "| large-object images | large-object mean IU | dominant-class IU | train minutes "
              "| epochs | converged |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in summary.items():
        setting = next((r["setting"] for r in results["runs"] if r["setting_name"] == name), {})
        overrides = ", ".join(f"`{k}={v}`" for k, v in setting.items()) or "(base)"
        lines.append(
            f"| {name} | {overrides} | {len(row['seeds'])} | {_pm(row['mean_iu'])} "
            f"| {_pm(row['pixel_acc'])} | {_pm(row['mean_acc'])} "
            f"| {_pm(row['large_object_images'], 1)} "
            f"| {_pm(row['large_object_mean_iu'])} | {_pm(row['dominant_class_iu'])} "
            f"| {_pm(row['train_minutes'], 2)} | {_pm(row['epochs_run'], 1)} "
            f"| {row['converged']}/{len(row['seeds'])} |"
        )
    nets = list(dict.fromkeys(n for row in summary.values() for n in row.get("stage_mean_iu", {})))
    if nets:
        lines += ["", "## Mean IU of every staged net", ""]
        lines += ["| setting | " + " | ".join(nets) + " |", "|---" * (len(nets) + 1) + "|"]
        for name, row in summary.items():
            cells = " | ".join(_pm(row["stage_mean_iu"].get(n, (None, None, 0))) for n in nets)
            lines.append(f"| {name} | {cells} |")
    target = results.get("target_val_mean_iu")
    if target is not None:
        lines += ["", f"## Time to a validation mean IU of {target}", ""]
        lines += [
            "First epoch whose validation mean IU (whole validation images) is at least "
            f"{target}; epochs, images (training samples: patches in patch mode) and "
            "minutes accumulate over the staged trainings (FCN-32s, -16s, ...); mean ± std "
            "over the runs that got there.",
            "",
        ]
        lines += ["| setting | reached | epochs | images seen | minutes |", "|---|---|---|---|---|"]
        for name, row in summary.items():
            lines.append(
                f"| {name} | {row['epochs_to_target'][2]}/{len(row['seeds'])} "
                f"| {_pm(row['epochs_to_target'], 2)} | {_pm(row['images_to_target'], 0)} "
                f"| {_pm(row['minutes_to_target'], 2)} |"
            )
    classes = list(dict.fromkeys(c for row in summary.values() for c in row["per_class_iu"]))
    lines += ["", "## Per-class IU", "", "| class | " + " | ".join(settings) + " |"]
    lines.append("|---" * (len(settings) + 1) + "|")
    for c in classes:
        cells = " | ".join(
            _pm(summary[s]["per_class_iu"].get(c, (None, None, 0))) for s in settings
        )
        lines.append(f"| {c} | {cells} |")
    lines += [
        "",
        "## Comparisons",
        "",
        f"Test: {TEST_NAME} over the seeds; 95 % "
        "confidence interval of a - b (Welch-Satterthwaite); p adjusted by Holm's method "
        "within each family (one metric over the study's pairs; per-class IU: every class "
        f"and pair). A difference is detected when the adjusted p < {ALPHA}; no detected "
        "difference is not a proof of equality: the interval shows which differences "
        "the seeds cannot rule out. Undefined tests (fewer than 2 seeds, or no spread "
        "on either side) show '-'. A comparison marked *unconverged* involves runs whose "
        "curves were still rising (rule above): it holds for that budget only.",
        "",
    ]
    if comparisons:
        lines += comparison_table(comparisons)
    else:
        lines.append("No comparisons (one setting).")
    if per_class:
        lines += ["", "## Per-class comparisons", "", *comparison_table(per_class)]
    lines += ["", "## Plots", "", "![per-class IU](per_class_iu.png)", ""]
    lines += ["![validation mean IU against images seen](val_mean_iu_vs_images.png)", ""]
    lines += ["![validation mean IU against minutes](val_mean_iu_vs_minutes.png)", ""]
    lines += ["![validation mean IU against epochs](val_mean_iu_vs_epochs.png)", ""]
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_per_class(path: Path, summary: dict) -> None:
    """Grouped bars: per-class IU per setting, mean over seeds with std error bars."""
    plt = _pyplot()
    settings = list(summary)
    classes = list(dict.fromkeys(c for row in summary.values() for c in row["per_class_iu"]))
    width = 0.8 / max(len(settings), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(classes) * max(1, len(settings) / 2)), 4))
    for i, setting in enumerate(settings):
        stats = [summary[setting]["per_class_iu"].get(c, (None, None, 0)) for c in classes]
        means = [s[0] if s[0] is not None else np.nan for s in stats]
        errors = [s[1] if s[1] is not None else 0.0 for s in stats]
        ax.bar(
            np.arange(len(classes)) + i * width, means, width, yerr=errors, label=setting, capsize=2
        )
    ax.set_xticks(np.arange(len(classes)) + width * (len(settings) - 1) / 2, classes, rotation=30)
    ax.set_ylabel("IU (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(path: Path, runs: list[dict], x_key: str, x_label: str) -> None:
    """Validation mean IU per epoch against ``x_key``: one line per run, one colour per setting."""
    plt = _pyplot()
    settings = list(dict.fromkeys(r["setting_name"] for r in runs))
    colors = {s: f"C{i % 10}" for i, s in enumerate(settings)}
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        curve = run.get("curve") or {}
        label = (
            run["setting_name"]
            if run is next(r for r in runs if r["setting_name"] == run["setting_name"])
            else None
        )
        ax.plot(
            curve.get(x_key, []),
            curve.get("val_mean_iu", []),
            marker=".",
            color=colors[run["setting_name"]],
            label=label,
            alpha=0.8,
        )
    ax.set_xlabel(x_label)
    ax.set_ylabel("validation mean IU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out: str | Path, results: dict, pairs: list[tuple[str, str]]) -> Path:
    """Write ``results.json``, ``report.md`` and the PNGs into ``out`` atomically."""
    settings = list(dict.fromkeys(r["setting_name"] for r in results["runs"]))
    summary = aggregate(results["runs"], settings)
    comparisons = [
        row for metric in ("mean_iu", "pixel_acc", "mean_acc", *LARGE_OBJECT_METRICS)
        for row in compare(results["runs"], pairs, metric)
    ]  # fmt: skip
    scored = results.get("variant")
    nets = dict.fromkeys(n for r in results["runs"] for n in r.get("stage_mean_iu", {}))
    for net in (n for n in nets if n != scored):
        comparisons += compare(results["runs"], pairs, stage=net)
    if results.get("target_val_mean_iu") is not None:
        comparisons += compare(results["runs"], pairs, "epochs_to_target")
    per_class = compare_classes(results["runs"], pairs)
    with atomic_output_dir(out) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / "report.md").write_text(report_markdown(results, summary, comparisons, per_class))
        plot_per_class(tmp / "per_class_iu.png", summary)
        plot_curves(
            tmp / "val_mean_iu_vs_images.png",
            results["runs"],
            "images_seen",
            "training images seen (patches in patch mode)",
        )
        plot_curves(
            tmp / "val_mean_iu_vs_minutes.png", results["runs"], "minutes", "training minutes"
        )
        plot_curves(
            tmp / "val_mean_iu_vs_epochs.png",
            results["runs"],
            "epochs",
            "training epochs (passes over the train split, FCN-32s -> 16s -> 8s)",
        )
    return Path(out)
