"""A trained ``model.pt`` as a file a deployment runtime loads: ONNX or TorchScript.

Both take a float32 ``(N, 3, H, W)`` batch normalised with the model's mean and std
and return ``(N, K, H, W)`` class scores, with batch, height and width dynamic (any
image size, as the FCN is fully convolutional; the ``paper`` geometry's crops follow
the input size). What a user of the file needs besides the graph rides along as
JSON under the key ``fcn_pipeline``: class names and colours, mean and std, output
stride and the training record of ``fcn-pipeline predict --info``. ONNX keeps it in
``metadata_props``, TorchScript in the archive's extra file ``fcn_pipeline``.

ONNX goes through ``torch.onnx.export(..., dynamo=True)`` (needs ``onnx`` and
``onnxscript``); TorchScript through ``torch.jit.trace``, whose recorded graph reads
the sizes from the input (checked at several sizes by the tests). Files are written
atomically.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import torch

from fcn_pipeline.atomic import atomic_file
from fcn_pipeline.checkpoints import MODEL_FORMAT, load_file, model_from_record
from fcn_pipeline.errors import PipelineError, printable
from fcn_pipeline.scorers import METADATA_KEY, ModelInfo, model_info

ExportFormat = Literal["onnx", "torchscript"]
OPSET = 18
# The example input a graph is recorded with; the exported graph takes any size.
EXAMPLE_SIZE = (96, 128)


def _load(model_path: str | Path) -> tuple[torch.nn.Module, ModelInfo]:
    record = load_file(model_path, MODEL_FORMAT)
    model = model_from_record(record, model_path).eval()
    return model, model_info(record, model)


def export_onnx(model_path: str | Path, out: str | Path) -> Path:
    """Write ``model_path``'s net as ONNX (opset 18) with dynamic batch, height, width."""
    try:
        import onnx
    except ImportError:
        raise PipelineError(
            "ONNX export needs onnx and onnxscript (pip install -e '.[export]')"
        ) from None
    model, info = _load(model_path)
    example = torch.zeros((1, 3, *EXAMPLE_SIZE))
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"),
            3: torch.export.Dim("width")}  # fmt: skip
    out = Path(out)
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / "model.onnx"
        with torch.no_grad():
            program = torch.onnx.export(
                model, (example,), None, input_names=["image"], output_names=["scores"],
                dynamic_shapes={"x": dims}, opset_version=OPSET, dynamo=True, verbose=False,
            )  # fmt: skip
        program.save(str(staged))
        graph = onnx.load(str(staged))
        onnx.helper.set_model_props(graph, {METADATA_KEY: json.dumps(info.to_json())})
        with atomic_file(out) as tmp:
            onnx.save(graph, str(tmp))
    return out


def export_torchscript(model_path: str | Path, out: str | Path) -> Path:
    """Write ``model_path``'s net as a traced TorchScript archive with the metadata."""
    model, info = _load(model_path)
    out = Path(out)
    # TorchScript is deprecated in favour of torch.export, but still what C++ and
    # mobile runtimes load; the warnings say nothing about this file.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            traced = torch.jit.trace(model, torch.zeros((1, 3, *EXAMPLE_SIZE)), check_trace=False)
        metadata = {METADATA_KEY: json.dumps(info.to_json())}
        with atomic_file(out) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files=metadata)
    return out


def export(model_path: str | Path, fmt: ExportFormat, out: str | Path) -> Path:
    """``fcn-pipeline export``: ``model_path`` as ``fmt`` at ``out``."""
    if fmt == "onnx":
        return export_onnx(model_path, out)
    if fmt == "torchscript":
        return export_torchscript(model_path, out)
    raise PipelineError(f"--format {printable(str(fmt))}: choose onnx or torchscript")


def torchscript_info(path: str | Path) -> ModelInfo:
    """The metadata of a TorchScript file written by :func:`export_torchscript`."""
    files = {METADATA_KEY: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return ModelInfo.from_json(json.loads(files[METADATA_KEY]), printable(path))


__all__ = ["export", "export_onnx", "export_torchscript", "torchscript_info"]
