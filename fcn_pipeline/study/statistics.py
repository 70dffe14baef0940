"""Aggregation over seeds and the comparisons: Welch's t-test with its confidence
interval, Holm's correction within each family, per-class families."""

import warnings
from typing import Any

import numpy as np

from fcn_pipeline.study.records import LARGE_OBJECT_METRICS, TARGET_UNITS, RunRecord

ALPHA = 0.05  # two-sided significance level of the comparisons
TEST_NAME = "Welch's two-sample t-test (unequal variances), two-sided"


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


def aggregate(runs: list[RunRecord], settings: list[str]) -> dict[str, dict[str, Any]]:
    """Per setting: mean, std and count over its seeds of mean IU, per-class IU, the
    large-object scores and training minutes (each as ``[mean, std, n]``)."""
    summary: dict[str, dict[str, Any]] = {}
    for setting in settings:
        mine = [r for r in runs if r.setting_name == setting]
        metrics = [r.metrics for r in mine]
        classes = list(dict.fromkeys(c for m in metrics for c in m.per_class_iu))
        summary[setting] = {
            "seeds": [r.seed for r in mine],
            "mean_iu": mean_std([m.mean_iu for m in metrics]),
            "pixel_acc": mean_std([m.pixel_acc for m in metrics]),
            "mean_acc": mean_std([m.mean_acc for m in metrics]),
            "per_class_iu": {
                c: mean_std([m.per_class_iu.get(c) for m in metrics]) for c in classes
            },
            "large_object_images": mean_std([m.large_object.images for m in metrics]),
            "large_object_mean_iu": mean_std([m.large_object.mean_iu for m in metrics]),
            "dominant_class_iu": mean_std([m.large_object.dominant_class_iu for m in metrics]),
            "train_minutes": mean_std([r.train_minutes for r in mine]),
            "epochs_run": mean_std([r.epochs_run for r in mine]),
            "converged": sum(bool(r.converged) for r in mine),
            **{
                f"{unit}_to_target": mean_std([(r.to_target or {}).get(unit) for r in mine])
                for unit in TARGET_UNITS
                if any(r.to_target is not None for r in mine)
            },
            "stage_mean_iu": {
                net: mean_std([r.stage_mean_iu.get(net) for r in mine])
                for net in dict.fromkeys(n for r in mine for n in r.stage_mean_iu)
            },
        }
    return summary


def run_value(run: RunRecord, metric: str = "mean_iu", stage: str | None = None) -> float | None:
    """One run's number: a test metric (``mean_iu``, ``pixel_acc``, ``mean_acc``), a
    large-object score, ``IU <class>``, a staged net's mean IU (``stage``), or
    ``<unit>_to_target`` (a :data:`TARGET_UNITS` unit)."""
    if stage is not None:
        return run.stage_mean_iu.get(stage)
    if metric.endswith("_to_target"):
        return (run.to_target or {}).get(metric.removesuffix("_to_target"))
    if metric in LARGE_OBJECT_METRICS:
        return getattr(run.metrics.large_object, LARGE_OBJECT_METRICS[metric])
    if metric.startswith("IU "):
        return run.metrics.per_class_iu.get(metric.removeprefix("IU "))
    return getattr(run.metrics, metric)


def compare(
    runs: list[RunRecord],
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
            [run_value(r, metric, stage) for r in runs if r.setting_name == s]
            for s in (first, second)
        ]
        values = [[v for v in side if v is not None] for side in every]
        if metric.endswith("_to_target") and any(None in side for side in every):
            values, test = [[], []], welch_t_test([], [])
        else:
            test = welch_t_test(*values)
        diff = float(np.mean(values[0]) - np.mean(values[1])) if all(values) else None
        name = f"{stage} mean_iu" if stage is not None else metric
        unconverged = sum(not r.converged for r in runs if r.setting_name in (first, second))
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


def compare_classes(runs: list[RunRecord], pairs: list[tuple[str, str]]) -> list[dict]:
    """Per-class IU of each pair, one family over every (class, pair) for Holm's
    adjustment (a run where the class is absent is left out)."""
    classes = list(dict.fromkeys(c for r in runs for c in r.metrics.per_class_iu))
    family = [row for name in classes for row in compare(runs, pairs, f"IU {name}")]
    return with_holm(family)
