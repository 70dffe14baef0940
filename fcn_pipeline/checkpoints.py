"""The files training writes: ``model.pt`` (a trained net) and ``checkpoint.pt`` (resume).

Both are dicts of tensors and plain Python values with a ``format`` tag, written
atomically with ``torch.save`` and read with ``torch.load(..., weights_only=True)``,
so a foreign or malicious file is refused instead of unpickled.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcn_pipeline.atomic import atomic_file
from fcn_pipeline.errors import CheckpointError, OutputError, load_error_reason
from fcn_pipeline.models import build_fcn

MODEL_FILE = "model.pt"  # the best validation epoch's weights
LAST_MODEL_FILE = "model_last.pt"  # the last epoch's weights
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FORMAT = "fcn-pipeline-model/1"
# 2: holds the lr scheduler's state; 3: the best epoch's weights and the runtime
CHECKPOINT_FORMAT = "fcn-pipeline-checkpoint/3"


def load_file(path: str | Path, expected_format: str) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file raises many kinds
        reason = load_error_reason(error)
        raise CheckpointError(f"{path}: corrupt or not a PyTorch file ({reason})") from None
    if not isinstance(content, dict) or content.get("format") != expected_format:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise CheckpointError(f"{path}: not a {expected_format} file (found {found!r})")
    return content


def save_file(path: str | Path, content: dict[str, Any]) -> None:
    """``torch.save`` through a temporary file and an atomic rename; raises
    :class:`OutputError` naming ``path`` when it cannot be written."""
    with atomic_file(path) as tmp:
        try:
            torch.save(content, tmp)
        except RuntimeError as error:  # a full disk: "[enforce fail ...] unexpected pos"
            raise OutputError(f"{path}: cannot write (disk full?): {error}") from error


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_record(model: nn.Module, class_names: list[str], **extra: Any) -> dict[str, Any]:
    """What ``model.pt`` holds: how to rebuild the net, its weights and the class names."""
    return {
        "format": MODEL_FORMAT,
        "variant": model.variant,
        "num_classes": model.num_classes,
        "class_names": list(class_names),
        "backbone": "vgg16",
        "width": float(model.width),
        "upsample": model.upsample,
        "geometry": model.geometry,
        "norm": model.norm,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        **extra,
    }


def load_model(path: str | Path, class_names: list[str] | None = None) -> nn.Module:
    """Rebuild the net saved in ``model.pt``; check its classes against ``class_names``.

    Raises :class:`CheckpointError` naming the file if it is missing, corrupt,
    or was trained on another number (or list) of classes.
    """
    record = load_file(path, MODEL_FORMAT)
    try:
        model = build_fcn(
            record["variant"],
            int(record["num_classes"]),
            backbone=record["backbone"],
            width=float(record["width"]),
            upsample=record["upsample"],
            # records written before these options existed are paper/none nets
            geometry=record.get("geometry", "paper"),
            norm=record.get("norm", "none"),
        )
        model.load_state_dict(record["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: model record does not load ({error})") from None
    if class_names is not None and list(record["class_names"]) != list(class_names):
        raise CheckpointError(
            f"{path}: trained on {record['num_classes']} classes {record['class_names']}, "
            f"the dataset has {len(class_names)} classes {list(class_names)}"
        )
    return model


__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "LAST_MODEL_FILE",
    "MODEL_FILE",
    "MODEL_FORMAT",
    "file_sha256",
    "load_file",
    "load_model",
    "model_record",
    "save_file",
]
