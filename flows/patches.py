"""The ``patches`` stage as a Prefect flow."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from fcn_pipeline.config import ExecutorParams, PatchesParams
from flows.common import TASK_DEFAULTS, stage_params
from flows.executor import shard_mapper

# The params.yaml groups this stage reads; dvc.yaml declares the same.
PARAMS = ("patches", "executor")


@task(name="extract-patches", **TASK_DEFAULTS)
def extract_train_patches(
    params: PatchesParams, executor: ExecutorParams | None = None
) -> dict[str, Any]:
    """Cut the train-split patches of ``params.data`` into ``params.out``."""
    from fcn_pipeline.patches import extract_patches

    logger = get_run_logger()
    result = extract_patches(
        params,
        on_shard=lambda source, shard: logger.info(
            "cut %d patches from %d images of %s", shard.patches, shard.images, source.name
        ),
        mapper=shard_mapper(executor or ExecutorParams()),
    )
    summary = result.summary
    logger.info(
        "%s: %d patches of %dx%d from %d images in %.1f s into %s",
        params.strategy,
        summary["patches"],
        params.patch_size,
        params.patch_size,
        summary["source_images"],
        result.seconds,
        result.out,
    )
    rarest = summary["rarest_class"]
    if rarest:
        logger.info(
            "rarest train class %r: %.4f of the patch pixels, %.4f under uniform sampling "
            "with the same budget (gain %s)",
            rarest["name"],
            rarest["share"],
            rarest["uniform_share"],
            "n/a" if rarest["gain_over_uniform"] is None else f"{rarest['gain_over_uniform']:.2f}x",
        )
    return {"out": str(result.out), "patches": summary["patches"], "rarest_class": rarest}


@flow(name="patches", log_prints=True)
def patches_flow(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict:
    """Run the patches stage with ``params_file`` (``patches:`` section) and overrides."""
    params = stage_params(params_file, overrides, PARAMS)
    return extract_train_patches(params.patches, params.executor)
