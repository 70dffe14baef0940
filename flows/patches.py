"""The ``patches`` stage: training patches cut from the train split."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from flows.executor import shard_mapper
from flows.stages import Report

# The params.yaml groups this stage reads; dvc.yaml declares the same.
PARAMS = ("patches", "executor")


def run(params: SimpleNamespace, variant: str | None, report: Report) -> dict[str, Any]:
    """Cut the train-split patches of ``data.out`` into ``patches.out``."""
    from fcn_pipeline.patches import extract_patches

    cut = params.patches
    result = extract_patches(
        cut,
        on_shard=lambda source, shard: report.info(
            "cut %d patches from %d images of %s", shard.patches, shard.images, source.name
        ),
        mapper=shard_mapper(params.executor),
    )
    summary = result.summary
    report.info(
        "%s: %d patches of %dx%d from %d images in %.1f s into %s", cut.strategy,
        summary["patches"], cut.patch_size, cut.patch_size, summary["source_images"],
        result.seconds, result.out,
    )  # fmt: skip
    rarest = summary["rarest_class"]
    if rarest:
        gain = rarest["gain_over_uniform"]
        report.info(
            "rarest train class %r: %.4f of the patch pixels, %.4f under uniform sampling "
            "with the same budget (gain %s)", rarest["name"], rarest["share"],
            rarest["uniform_share"], "n/a" if gain is None else f"{gain:.2f}x",
        )  # fmt: skip
    return {"out": str(result.out), "patches": summary["patches"], "rarest_class": rarest}
