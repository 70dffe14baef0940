"""What predicting needs from a model file, and the scorers that run it.

:func:`load_scorer` reads a ``model.pt`` (rebuilt in PyTorch) or an ``.onnx`` file
written by :mod:`fcn_pipeline.export` (run by ONNX Runtime) and returns its
:class:`ModelInfo` (class names and colours, input normalisation, output stride, the
training record) and a scorer: a callable from a normalised ``(N, 3, H, W)`` float32
batch to ``(N, K, H, W)`` float32 scores on the CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcn_pipeline.checkpoints import MODEL_FORMAT, load_file
from fcn_pipeline.data import IMAGENET_MEAN, IMAGENET_STD
from fcn_pipeline.errors import CheckpointError, PipelineError, printable

ONNX_SUFFIX = ".onnx"
METADATA_KEY = "fcn_pipeline"  # ONNX metadata_props key / TorchScript extra file name


# --- the model file ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What predicting needs besides the weights, as the model file records it."""

    variant: str
    class_names: list[str]
    class_colors: list[list[int]]
    mean: list[float]
    std: list[float]
    output_stride: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "class_names": self.class_names,
            "class_colors": self.class_colors,
            "mean": self.mean,
            "std": self.std,
            "output_stride": self.output_stride,
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> ModelInfo:
        try:
            names = [str(name) for name in data["class_names"]]
            return cls(
                variant=str(data["variant"]),
                class_names=names,
                class_colors=[[int(c) for c in color] for color in data["class_colors"]],
                mean=[float(v) for v in data["mean"]],
                std=[float(v) for v in data["std"]],
                output_stride=int(data["output_stride"]),
                extra={k: v for k, v in data.items() if k not in _INFO_KEYS},
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{source}: incomplete model metadata ({error})") from None


_INFO_KEYS = ("variant", "class_names", "class_colors", "mean", "std", "output_stride")


def default_colors(count: int) -> list[list[int]]:
    """Distinct colours for a model file that records none (before colours were kept)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(count, 3)).tolist()


def model_info(record: dict[str, Any], model: torch.nn.Module) -> ModelInfo:
    """The :class:`ModelInfo` of a ``model.pt`` record and the net it rebuilds."""
    names = list(record["class_names"])
    normalization = record.get("normalization") or {}
    extra = {
        key: record[key]
        for key in ("width", "geometry", "norm", "upsample", "best_epoch", "last_epoch",
                    "stopped_on_plateau", "runtime", "data", "mode")
        if key in record
    }  # fmt: skip
    history = record.get("history") or []
    if history and record.get("epoch"):
        extra["val_scores"] = history[int(record["epoch"]) - 1]
    if record.get("train_params"):
        extra["train_params"] = record["train_params"]
    return ModelInfo(
        variant=model.variant,
        class_names=names,
        class_colors=record.get("class_colors") or default_colors(len(names)),
        mean=list(normalization.get("mean", IMAGENET_MEAN)),
        std=list(normalization.get("std", IMAGENET_STD)),
        output_stride=int(model.output_stride),
        extra=extra,
    )


class TorchScorer:
    """Scores of a ``model.pt`` net: ``(N, 3, H, W)`` normalised float32 -> ``(N, K, H, W)``
    float32 on the CPU; bf16 autocast on CUDA as in training, float32 on the CPU."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        from fcn_pipeline.runtime import autocast, to_device

        self.model = model.eval().to(device, memory_format=torch.channels_last)
        self.device = device
        self._autocast, self._to_device = autocast, to_device

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast(self.device):
            scores = self.model(self._to_device(x, self.device))
        return scores.float().cpu()


class OnnxScorer:
    """Scores of an exported ``.onnx`` net through ONNX Runtime (CPU)."""

    def __init__(self, path: Path):
        try:
            import onnxruntime
        except ImportError:
            raise PipelineError(
                f"{printable(path)}: predicting from ONNX needs onnxruntime "
                "(pip install -e '.[export]')"
            ) from None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph kinds
            first = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
            raise CheckpointError(
                f"{printable(path)}: not a loadable ONNX model ({first})"
            ) from None
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (scores,) = self.session.run(None, {self.input: x.numpy()})
        return torch.from_numpy(scores)


def load_scorer(path: str | Path, device: str = "auto") -> tuple[ModelInfo, Any]:
    """The :class:`ModelInfo` and a scorer of a ``model.pt`` or an exported ``.onnx``."""
    path = Path(path)
    if path.suffix.lower() == ONNX_SUFFIX:
        return onnx_info(path), OnnxScorer(path)
    from fcn_pipeline.checkpoints import model_from_record
    from fcn_pipeline.runtime import resolve_device

    record = load_file(path, MODEL_FORMAT)
    model = model_from_record(record, path)
    return model_info(record, model), TorchScorer(model, resolve_device(device))


def onnx_info(path: Path) -> ModelInfo:
    """The metadata ``fcn-pipeline export`` wrote into an ONNX file's ``metadata_props``."""
    if not path.is_file():
        raise CheckpointError(f"{printable(path)}: not found")
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except ImportError:
        raise PipelineError("reading ONNX files needs onnx (pip install -e '.[export]')") from None
    except Exception as error:  # protobuf's DecodeError and friends
        raise CheckpointError(f"{printable(path)}: not an ONNX file ({error})") from None
    props = {prop.key: prop.value for prop in model.metadata_props}
    if METADATA_KEY not in props:
        raise CheckpointError(
            f"{printable(path)}: no fcn-pipeline metadata (class names, colours, "
            "normalisation); export the model with `fcn-pipeline export`"
        )
    try:
        data = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{printable(path)}: metadata is not JSON ({error})") from None
    return ModelInfo.from_json(data, printable(path))


__all__ = [
    "METADATA_KEY",
    "ModelInfo",
    "OnnxScorer",
    "TorchScorer",
    "load_scorer",
    "model_info",
    "onnx_info",
]
