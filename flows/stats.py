"""The ``stats`` stage as a Prefect flow."""

from __future__ import annotations

import warnings
from typing import Any

from prefect import flow, get_run_logger, task

from fcn_pipeline.config import ExecutorParams, StatsParams
from fcn_pipeline.stats import DatasetCounts
from flows.common import TASK_DEFAULTS, stage_params
from flows.executor import shard_mapper

# The params.yaml groups this stage reads; dvc.yaml declares the same.
PARAMS = ("stats", "executor")


@task(name="count-class-pixels", **TASK_DEFAULTS)
def count_class_pixels(
    params: StatsParams, executor: ExecutorParams | None = None
) -> DatasetCounts:
    """Count labelled pixels per class and split of ``params.data``, shards in parallel."""
    from fcn_pipeline.stats import count_classes

    logger = get_run_logger()
    counts = count_classes(
        params.data,
        params.workers,
        on_shard=lambda split, path, images: logger.info(
            "counted %s/%s (%d images)", split, path.name, images
        ),
        mapper=shard_mapper(executor or ExecutorParams()),
    )
    for split, split_counts in counts.splits.items():
        logger.info(
            "%s: %d images, %d labelled and %d ignored pixels",
            split,
            split_counts.images,
            split_counts.labelled_pixels,
            split_counts.ignored_pixels,
        )
    return counts


@task(name="write-class-weights", **TASK_DEFAULTS)
def write_class_weights(counts: DatasetCounts, out: str) -> dict[str, Any]:
    """Compute every weighting scheme on the train split; write stats.json and the plot."""
    from fcn_pipeline.stats import write_stats

    logger = get_run_logger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = write_stats(counts, out)
    for warning in caught:
        logger.warning("%s", warning.message)
    for scheme, weights in result.weights.items():
        logger.info(
            "%s weights: %s",
            scheme,
            ", ".join(f"{n}={w:.3g}" for n, w in zip(counts.class_names, weights, strict=True)),
        )
    logger.info("wrote class statistics to %s", result.out)
    return {"out": str(result.out), "absent_classes": result.absent_classes}


@flow(name="stats", log_prints=True)
def stats_flow(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict:
    """Run the stats stage with ``params_file`` (``stats:`` section) and overrides."""
    params = stage_params(params_file, overrides, PARAMS)
    counts = count_class_pixels(params.stats, params.executor)
    return write_class_weights(counts, params.stats.out)
