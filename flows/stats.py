"""The ``stats`` stage: per-class pixel counts and the class weights."""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Any

from flows.executor import shard_mapper
from flows.stages import Report

# The params.yaml groups this stage reads; dvc.yaml declares the same.
PARAMS = ("stats", "executor")


def run(params: SimpleNamespace, variant: str | None, report: Report) -> dict[str, Any]:
    """Count labelled pixels per class and split; write stats.json, weights and plot."""
    from fcn_pipeline.stats import count_classes, write_stats

    counts = count_classes(
        params.stats.data,
        params.stats.workers,
        on_shard=lambda split, path, images: report.info(
            "counted %s/%s (%d images)", split, path.name, images
        ),
        mapper=shard_mapper(params.executor),
    )
    for split, split_counts in counts.splits.items():
        report.info(
            "%s: %d images, %d labelled and %d ignored pixels", split, split_counts.images,
            split_counts.labelled_pixels, split_counts.ignored_pixels,
        )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = write_stats(counts, params.stats.out)
    for warning in caught:
        report.warning("%s", warning.message)
    for scheme, weights in result.weights.items():
        named = zip(counts.class_names, weights, strict=True)
        report.info("%s weights: %s", scheme, ", ".join(f"{n}={w:.3g}" for n, w in named))
    report.table(
        "stats-class-weights",
        [
            {"class": name, **{s: round(float(w[i]), 4) for s, w in result.weights.items()}}
            for i, name in enumerate(counts.class_names)
        ],
        "class weights of every scheme, from the train split's pixel counts",
    )
    report.info("wrote class statistics to %s", result.out)
    return {"out": str(result.out), "absent_classes": result.absent_classes}
