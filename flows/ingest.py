"""The ``ingest`` stage as a Prefect flow."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from fcn_pipeline.config import DataParams, ExecutorParams
from flows.common import TASK_DEFAULTS, stage_params
from flows.executor import shard_mapper

# The params.yaml groups this stage reads; dvc.yaml declares the same.
PARAMS = ("data", "executor")


@task(name="ingest-dataset", **TASK_DEFAULTS)
def ingest_dataset(params: DataParams, executor: ExecutorParams | None = None) -> dict[str, Any]:
    """Validate, encode and shard the source dataset into ``params.out``."""
    from fcn_pipeline.ingest import ingest

    logger = get_run_logger()
    result = ingest(
        params,
        on_shard=lambda job, rows: logger.info("wrote %s (%d images)", job.relpath, rows),
        mapper=shard_mapper(executor or ExecutorParams()),
    )
    counts = {split: result.meta.split_images(split) for split in result.meta.splits}
    logger.info(
        "ingested %d images %s from %s in %.1f s (%.1f images/s) into %s",
        result.images,
        counts,
        params.format,
        result.seconds,
        result.images / result.seconds,
        result.out,
    )
    return {"out": str(result.out), "images": counts, "classes": result.meta.class_names}


@flow(name="ingest", log_prints=True)
def ingest_flow(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict:
    """Run the ingest stage with ``params_file`` (``data:`` section) and overrides."""
    params = stage_params(params_file, overrides, PARAMS)
    return ingest_dataset(params.data, params.executor)
