"""The report of a study: ``results.json``, ``report.md`` and the PNG plots, written
atomically."""

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fcn_pipeline.atomic import atomic_output_dir
from fcn_pipeline.convergence import FLAT_RULE
from fcn_pipeline.markdown import cell
from fcn_pipeline.study.records import LARGE_OBJECT_METRICS, RunRecord
from fcn_pipeline.study.statistics import ALPHA, TEST_NAME, aggregate, compare, compare_classes

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
        interval = (f"[{cell(c['ci_low'], digits)}, {cell(c['ci_high'], digits)}]"
                    if c.get("ci_low") is not None else "-")  # fmt: skip
        cells = [cell(c["difference"], digits), interval, cell(c["t"], 3), cell(c["df"], 1),
                 cell(c["p"], 4), cell(c.get("p_holm"), 4)]  # fmt: skip
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
    runs = [RunRecord.from_json(entry) for entry in results["runs"]]
    lines = [f"# Study `{results['study']}`", ""]
    lines += [f"- dataset: {results['dataset']}; variant scored: {results['variant']}"]
    lines += [f"- runs: {len(runs)} ({len(summary)} settings x seeds)"]
    lines += _machines(runs)
    lines += ["- ± is the sample standard deviation over seeds (n - 1)"]
    lines += [f"- converged: {FLAT_RULE}", ""]
    lines += _settings_table(runs, summary)
    lines += _staged_nets_table(summary)
    lines += _time_to_target_table(results.get("target_val_mean_iu"), summary)
    lines += _per_class_table(summary)
    lines += ["", "## Comparisons", "", COMPARISONS_TEXT, ""]
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


COMPARISONS_TEXT = (
    f"Test: {TEST_NAME} over the seeds; 95 % "
    "confidence interval of a - b (Welch-Satterthwaite); p adjusted by Holm's method "
    "within each family (one metric over the study's pairs; per-class IU: every class "
    f"and pair). A difference is detected when the adjusted p < {ALPHA}; no detected "
    "difference is not a proof of equality: the interval shows which differences "
    "the seeds cannot rule out. Undefined tests (fewer than 2 seeds, or no spread "
    "on either side) show '-'. A comparison marked *unconverged* involves runs whose "
    "curves were still rising (rule above): it holds for that budget only."
)


def _machines(runs: list[RunRecord]) -> list[str]:
    """Where the runs trained, when their records say (minutes compare within one)."""
    counts = Counter(r.machine for r in runs if r.machine)
    if not counts:
        return []
    named = "; ".join(f"{machine}: {n} run{'s' * (n > 1)}" for machine, n in counts.items())
    note = " (train minutes compare only within one machine)" if len(counts) > 1 else ""
    return [f"- trained on: {named}{note}"]


def _settings_table(runs: list[RunRecord], summary: dict) -> list[str]:
    lines = ["| setting | overrides | seeds | mean IU | pixel acc. | mean (class) acc. "
             "| large-object images | large-object mean IU | dominant-class IU | train minutes "
             "| epochs | converged |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in summary.items():
        setting = next((r.setting for r in runs if r.setting_name == name), {})
        overrides = ", ".join(f"`{k}={v}`" for k, v in setting.items()) or "(base)"
        lines.append(
            f"| {name} | {overrides} | {len(row['seeds'])} | {_pm(row['mean_iu'])} "
            f"| {_pm(row['pixel_acc'])} | {_pm(row['mean_acc'])} "
            f"| {_pm(row['large_object_images'], 1)} "
            f"| {_pm(row['large_object_mean_iu'])} | {_pm(row['dominant_class_iu'])} "
            f"| {_pm(row['train_minutes'], 2)} | {_pm(row['epochs_run'], 1)} "
            f"| {row['converged']}/{len(row['seeds'])} |"
        )
    return lines


def _staged_nets_table(summary: dict) -> list[str]:
    nets = list(dict.fromkeys(n for row in summary.values() for n in row.get("stage_mean_iu", {})))
    if not nets:
        return []
    lines = ["", "## Mean IU of every staged net", ""]
    lines += ["| setting | " + " | ".join(nets) + " |", "|---" * (len(nets) + 1) + "|"]
    for name, row in summary.items():
        cells = " | ".join(_pm(row["stage_mean_iu"].get(n, (None, None, 0))) for n in nets)
        lines.append(f"| {name} | {cells} |")
    return lines


def _time_to_target_table(target: float | None, summary: dict) -> list[str]:
    if target is None:
        return []
    lines = ["", f"## Time to a validation mean IU of {target}", ""]
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
    return lines


def _per_class_table(summary: dict) -> list[str]:
    settings = list(summary)
    classes = list(dict.fromkeys(c for row in summary.values() for c in row["per_class_iu"]))
    lines = ["", "## Per-class IU", "", "| class | " + " | ".join(settings) + " |"]
    lines.append("|---" * (len(settings) + 1) + "|")
    for c in classes:
        cells = " | ".join(
            _pm(summary[s]["per_class_iu"].get(c, (None, None, 0))) for s in settings
        )
        lines.append(f"| {c} | {cells} |")
    return lines


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


def plot_curves(path: Path, runs: list[RunRecord], x_key: str, x_label: str) -> None:
    """Validation mean IU per epoch against ``x_key``: one line per run, one colour per setting."""
    plt = _pyplot()
    settings = list(dict.fromkeys(r.setting_name for r in runs))
    colors = {s: f"C{i % 10}" for i, s in enumerate(settings)}
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        curve = run.curve
        label = (
            run.setting_name
            if run is next(r for r in runs if r.setting_name == run.setting_name)
            else None
        )
        ax.plot(
            curve.get(x_key, []),
            curve.get("val_mean_iu", []),
            marker=".",
            color=colors[run.setting_name],
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
    """Write ``results.json`` (``results`` as given: its ``runs`` are
    :meth:`RunRecord.to_json` entries), ``report.md`` and the PNGs into ``out`` atomically."""
    runs = [RunRecord.from_json(entry) for entry in results["runs"]]
    settings = list(dict.fromkeys(r.setting_name for r in runs))
    summary = aggregate(runs, settings)
    comparisons = [
        row for metric in ("mean_iu", "pixel_acc", "mean_acc", *LARGE_OBJECT_METRICS)
        for row in compare(runs, pairs, metric)
    ]  # fmt: skip
    scored = results.get("variant")
    nets = dict.fromkeys(n for r in runs for n in r.stage_mean_iu)
    for net in (n for n in nets if n != scored):
        comparisons += compare(runs, pairs, stage=net)
    if results.get("target_val_mean_iu") is not None:
        comparisons += compare(runs, pairs, "epochs_to_target")
    per_class = compare_classes(runs, pairs)
    with atomic_output_dir(out) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / "report.md").write_text(report_markdown(results, summary, comparisons, per_class))
        plot_per_class(tmp / "per_class_iu.png", summary)
        plot_curves(
            tmp / "val_mean_iu_vs_images.png",
            runs,
            "images_seen",
            "training images seen (patches in patch mode)",
        )
        plot_curves(tmp / "val_mean_iu_vs_minutes.png", runs, "minutes", "training minutes")
        plot_curves(
            tmp / "val_mean_iu_vs_epochs.png",
            runs,
            "epochs",
            "training epochs (passes over the train split, FCN-32s -> 16s -> 8s)",
        )
    return Path(out)
