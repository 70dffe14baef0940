"""The files training writes: ``model.pt`` (a trained net) and ``checkpoint.pt`` (resume).

Both are dicts of tensors and plain Python values with a ``format`` tag, written
atomically with ``torch.save`` and read with ``torch.load(..., weights_only=True)``,
so a foreign or malicious file is refused instead of unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fcn_pipeline import distributed
from fcn_pipeline.atomic import atomic_file
from fcn_pipeline.errors import CheckpointError, OutputError, load_error_reason
from fcn_pipeline.models import build_fcn
from fcn_pipeline.runtime import cpu_capability, dtype_name

if TYPE_CHECKING:
    from fcn_pipeline.config import TrainParams
    from fcn_pipeline.data import SegmentationDataset

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
    """Hex SHA-256 of a file's bytes (read in chunks)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
    return model_from_record(load_file(path, MODEL_FORMAT), path, class_names)


def model_from_record(
    record: dict[str, Any], path: str | Path, class_names: list[str] | None = None
) -> nn.Module:
    """The net of a ``model.pt`` record already read from ``path`` (see :func:`load_model`)."""
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


# train params that say how many processes run, not what they compute.
DISTRIBUTED_KEYS = ("nproc_per_node", "nnodes", "rdzv_endpoint", "rdzv_id", "dist_timeout_s")
# --- resuming a training -------------------------------------------------------------


# train params that change neither what is computed nor how: where files go, how data
# reaches the loop, when to stop (a stop is decided again from the history on resume).
UNFINGERPRINTED = {
    "out",
    "live",
    "workers",
    "device",
    "eval_batch_size",
    "preload_mb",
    "plateau_patience",
    "plateau_min_gain",
    "precision",
    "threads",
}


def runtime_record(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """How this process computes, beyond the params: floating-point results of the same
    params and seed differ between devices, thread counts (how sums are split),
    autocast dtypes and CPU instruction sets (which kernels oneDNN dispatches)."""
    record: dict[str, Any] = {"device": device.type, "precision": dtype_name(dtype)}
    if device.type == "cpu":
        record.update(threads=torch.get_num_threads(), cpu=cpu_capability())
    return record


def run_fingerprint(
    params: TrainParams,
    net: str,
    epochs: int,
    datasets: list[SegmentationDataset],
    init_path: Path | None,
    world_size: int = 1,
    runtime: dict[str, Any] | None = None,
) -> str:
    """What a resumable checkpoint must match: the params that shape training, the
    net and its epochs, the data read (``dataset.json`` lists every shard), the
    initial model, the number of processes and ``runtime`` (:func:`runtime_record`)."""
    settings = params.model_dump(exclude=UNFINGERPRINTED)
    for key in DISTRIBUTED_KEYS:  # how the processes meet: not what they compute
        settings.pop(key)
    parts = {
        "params": settings,
        "epochs": epochs,
        "variant": net,
        "data": [(dataset.root / "dataset.json").read_text() for dataset in datasets],
        "init": file_sha256(init_path) if init_path else None,
        "runtime": runtime or {},
    }
    if world_size > 1:  # ranks draw their own dropout, flips and loss-sampling masks
        parts["world_size"] = world_size
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def weights_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s state (weights and BatchNorm statistics)."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@dataclass
class Progress:
    """What a run has done so far: its epochs' metrics and its best epoch's weights."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None

    @property
    def epoch(self) -> int:
        return len(self.history)


def set_aside(path: Path, reason: str, log: Callable[[str], None]) -> None:
    """Rename an unusable checkpoint to ``<name>.bad`` (replacing an older one), so that
    training starts over and the file stays for a look."""
    aside = path.with_name(path.name + ".bad")
    os.replace(path, aside)
    log(f"warning: {path}: {reason}; moved to {aside.name}, training starts over")


def _runtime_difference(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return ""
    changed = [
        f"{key} {old.get(key)} -> {new.get(key)}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
    return f" (it was written with another runtime: {', '.join(changed)})" if changed else ""


def _matching_state(
    path: Path, fingerprint: str, variant: str, log: Callable[[str], None],
    runtime: dict[str, Any] | None,
) -> dict[str, Any] | None:  # fmt: skip
    """The checkpoint at ``path`` if it is of this configuration (else None, said)."""
    if not path.exists():
        return None
    try:
        state = load_file(path, CHECKPOINT_FORMAT)
    except CheckpointError as error:
        set_aside(path, str(error).removeprefix(f"{path}: "), log)
        return None
    if state.get("fingerprint") != fingerprint:
        log(
            f"{variant}: {path} is from another configuration"
            f"{_runtime_difference(state.get('runtime'), runtime or {})}; starting over"
        )
        return None
    return state


def resume(
    checkpoint_path: Path,
    fingerprint: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    log: Callable[[str], None],
    runtime: dict[str, Any] | None = None,
    fallback: Path | None = None,
) -> Progress:
    """Restore the last saved epoch of the same configuration, if any: the metrics of
    the epochs done and the best epoch's weights (empty for a fresh start).
    ``fallback``: a checkpoint to resume from where the one at ``checkpoint_path`` is
    missing or of another configuration (one kept aside from a killed run).

    Under data parallelism rank 0 reads the checkpoint and hands it to the others, so
    it needs to exist only where rank 0 runs."""
    state, source = None, checkpoint_path
    if distributed.world_from_env().main:
        for source in [checkpoint_path, *([fallback] if fallback else [])]:
            state = _matching_state(source, fingerprint, model.variant, log, runtime)
            if state is not None:
                break
        if state is not None and source != checkpoint_path:  # the stage's own from now on
            with atomic_file(checkpoint_path) as tmp:
                shutil.copyfile(source, tmp)
    state = distributed.broadcast_from_main(state)
    if state is None:
        return Progress()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log(f"{model.variant}: resuming from {source} after epoch {state['epoch']}")
    # Interned keys, as a run's own epochs have them: model.pt then pickles the strings
    # it shares with the train params the same way, byte for byte, and the next net's
    # fingerprint (the hash of this model file) is the uninterrupted run's.
    history = [{sys.intern(k): value for k, value in epoch.items()} for epoch in state["history"]]
    return Progress(history, state["best_model"])


def save_checkpoint(
    path: Path,
    fingerprint: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    runtime: dict[str, Any],
) -> None:
    """Everything :func:`resume` needs to continue after the last epoch of ``progress``."""
    save_file(
        path,
        {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "runtime": runtime,
            "variant": model.variant,
            "epoch": progress.epoch,
            "model": model.state_dict(),
            "best_model": progress.best_state,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": progress.history,
        },
    )


__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "LAST_MODEL_FILE",
    "MODEL_FILE",
    "MODEL_FORMAT",
    "Progress",
    "file_sha256",
    "load_file",
    "load_model",
    "model_from_record",
    "model_record",
    "resume",
    "run_fingerprint",
    "runtime_record",
    "save_checkpoint",
    "save_file",
    "weights_copy",
]
