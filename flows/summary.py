"""The pipeline run's summary (the ``pipeline-summary`` artifact): the revision, what
DVC ran, each variant's scores and what changed against the commit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fcn_pipeline.markdown import cell

# The columns of the paper's tables, in its order (metric files: metrics/<variant>.json).
FCN_METRICS = {
    "pixel_acc": "pixel acc.",
    "mean_acc": "mean acc.",
    "mean_iu": "mean IU",
    "fw_iu": "f.w. IU",
}


def metrics_markdown(
    files: dict[str, dict[str, Any]],
    revision: dict[str, Any],
    dvc_run: dict[str, Any],
    diff: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The ``pipeline-summary`` artifact: the revision, what DVC ran, the metrics and what
    changed against the commit.

    ``files`` is :func:`read_metrics`' result. Files with the paper's scores
    (``metrics/<variant>.json``) make one table row per variant, named by the
    file's stem; every other metric DVC reports follows, per file. ``diff`` is
    :func:`read_metrics_diff`' result: one row per changed metric.
    """
    lines = ["# FCN metrics", ""]
    lines.append(f"- git commit: `{revision['commit']}`")
    if revision.get("experiment"):
        sha = revision.get("experiment_sha") or "?"
        lines.append(f"- DVC experiment: `{revision['experiment']}` (`{sha}`)")
    lines.append(f"- command: `{' '.join(dvc_run['command'])}`")
    lines.append(f"- stages run: {', '.join(dvc_run['ran']) or 'none'}")
    lines.append(f"- stages unchanged: {', '.join(dvc_run['skipped']) or 'none'}")
    lines.append("")
    if not files:
        lines.append("No metrics yet: `dvc metrics show` reports none for this revision.")
        return "\n".join(lines) + "\n"
    scored = {path: m for path, m in files.items() if set(m) & set(FCN_METRICS)}
    if scored:
        stems = [Path(path).stem for path in scored]
        unique = len(set(stems)) == len(stems)
        lines.append("| variant | " + " | ".join(FCN_METRICS.values()) + " |")
        lines.append("|---" * (len(FCN_METRICS) + 1) + "|")
        for path, metrics in scored.items():
            cells = " | ".join(cell(metrics.get(key)) for key in FCN_METRICS)
            lines.append(f"| {Path(path).stem if unique else path} | {cells} |")
        lines.append("")
    others = {
        path: {k: v for k, v in m.items() if k not in FCN_METRICS} for path, m in files.items()
    }
    if any(others.values()):
        lines += ["Other metrics:", ""]
        for path, metrics in others.items():
            if metrics:
                values = ", ".join(f"{k}={cell(v)}" for k, v in metrics.items())
                lines.append(f"- `{path}`: {values}")
        lines.append("")
    if diff is not None:
        lines += _diff_lines(diff, revision["commit"])
    return "\n".join(lines) + "\n"


def _diff_lines(diff: dict[str, dict[str, Any]], commit: str) -> list[str]:
    """The ``dvc metrics diff`` section of :func:`metrics_markdown`."""
    title = f"Against the committed reference (`dvc metrics diff`, commit `{commit[:7]}`):"
    if not diff:
        return [title, "", "No metric changed.", ""]
    lines = [title, "", "| file | metric | committed | now | change |", "|---|---|---|---|---|"]
    for path, metrics in diff.items():
        for key, change in metrics.items():
            cells = " | ".join(cell(change.get(k)) for k in ("old", "new", "diff"))
            lines.append(f"| `{path}` | {key} | {cells} |")
    return [*lines, ""]
