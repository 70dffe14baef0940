"""The ``fcn-pipeline/predict`` deployment: :func:`fcn_pipeline.predict.predict` as a
Prefect flow with the CLI's parameters, a table artifact of what it wrote."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger


# Named like the pipeline's flow so that its deployment is `fcn-pipeline/predict`.
@flow(name="fcn-pipeline", flow_run_name="predict {model}")
def predict_flow(
    model: str,
    inputs: list[str],
    out: str,
    tile: int | None = None,
    overlap: int = 0,
    context: int | None = None,
    flip: bool = False,
    overlay: bool = False,
    batch_size: int = 8,
    device: str = "auto",
    keep_going: bool = False,
) -> dict[str, Any]:
    """Class masks of ``inputs`` (files, directories, globs; relative to the project)
    by ``model`` (a ``model.pt`` or an exported ``.onnx``) into ``out``."""
    from prefect.artifacts import create_table_artifact

    from fcn_pipeline.errors import PipelineError
    from fcn_pipeline.predict import predict

    logger = get_run_logger()
    result = predict(
        model, inputs, out, tile=tile, overlap=overlap, flip=flip, overlay=overlay,
        **({} if context is None else {"context": context}),
        batch_size=batch_size, device=device, keep_going=keep_going, progress=False,
        log=logger.info,
    )  # fmt: skip
    rows = [{"mask": str(path), "status": "written"} for path in result.written]
    rows += [{"mask": str(path), "status": reason} for path, reason in result.failed]
    create_table_artifact(key="predict-outputs", table=rows, description=f"masks in {out}")
    if result.failed:
        raise PipelineError(f"{len(result.failed)} input(s) failed (listed in the log)")
    return {"written": [str(p) for p in result.written], "seconds": result.seconds}
