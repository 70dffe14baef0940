"""The ``ingest`` stage: a dataset validated, encoded and sharded into Parquet."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from flows.executor import shard_mapper
from flows.stages import Report

# The params.yaml groups this stage reads; dvc.yaml declares the same.
PARAMS = ("data", "executor")


def run(params: SimpleNamespace, variant: str | None, report: Report) -> dict[str, Any]:
    """Validate, encode and shard the source dataset into ``data.out``."""
    from fcn_pipeline.ingest import ingest

    result = ingest(
        params.data,
        on_shard=lambda job, rows: report.info("wrote %s (%d images)", job.relpath, rows),
        mapper=shard_mapper(params.executor),
    )
    counts = {split: result.meta.split_images(split) for split in result.meta.splits}
    report.info(
        "ingested %d images %s from %s in %.1f s (%.1f images/s) into %s",
        result.images, counts, params.data.format, result.seconds,
        result.images / result.seconds, result.out,
    )  # fmt: skip
    report.table(
        "ingest-splits",
        [{"split": split, "images": n} for split, n in counts.items()],
        f"images per split ingested from {params.data.format} into {result.out}",
    )
    return {"out": str(result.out), "images": counts, "classes": result.meta.class_names}
