"""What a training reads: its train set (whole images or patches), the validation
split and its loader, checked to share their classes and to split over the ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fcn_pipeline import distributed
from fcn_pipeline.config import TrainParams
from fcn_pipeline.data import (
    PreloadedDataset,
    SegmentationDataset,
    eval_loader,
    preload,
    train_loader,
)
from fcn_pipeline.errors import ConfigError, DatasetError


def training_set(params: TrainParams) -> SegmentationDataset:
    """The images one epoch iterates over: the ingested train split or the patches."""
    root = params.data if params.mode == "full" else params.patches
    return SegmentationDataset(root, "train")


def data_workers(dataset: Any, workers: int) -> int:
    """Loader processes for ``dataset``: none when it is already decoded in memory
    (a worker would only copy tensors between processes), else ``train.workers``."""
    return 0 if isinstance(dataset, PreloadedDataset) else workers


@dataclass
class TrainingData:
    """What a training reads: the train set, the validation loader and the class names."""

    train_set: SegmentationDataset
    val_set: SegmentationDataset
    val_loader: torch.utils.data.DataLoader
    class_names: list[str]
    steps_per_epoch: int


def build_data(
    params: TrainParams, device: torch.device, world: distributed.World | None = None
) -> TrainingData:
    """The train set of ``train.mode`` and the validation split, checked to share classes;
    the validation loader holds ``world``'s rank's share of the batches."""
    train_set = training_set(params)
    world = world or distributed.World()
    val_set = SegmentationDataset(params.data, params.val_split)
    steps = steps_per_epoch(train_set, params.batch_size)
    class_names = val_set.meta.class_names
    if train_set.meta.class_names != class_names:
        raise DatasetError(
            f"{train_set.root}: classes {train_set.meta.class_names} differ from "
            f"{val_set.root}'s {class_names}"
        )
    train_set, val_set = preload(train_set, params.preload_mb), preload(val_set, params.preload_mb)
    val_loader = eval_loader(
        val_set,
        params.eval_batch_size,
        workers=data_workers(val_set, params.workers),
        pin_memory=device.type == "cuda",
        rank=world.rank,
        world_size=world.size,
    )
    if world.distributed and (params.batch_size % world.size or len(train_set) < params.batch_size):
        raise ConfigError(
            f"train.batch_size ({params.batch_size}) is the global batch: it must divide over "
            f"the world size {world.size} and not exceed the {len(train_set)} training images"
        )
    return TrainingData(train_set, val_set, val_loader, class_names, steps)


def steps_per_epoch(train_set: SegmentationDataset, batch_size: int) -> int:
    """Optimizer steps in one epoch (incomplete last batches are dropped)."""
    return len(train_loader(train_set, batch_size, seed=0, workers=0, drop_last=True))


__all__ = ["TrainingData", "build_data", "data_workers", "steps_per_epoch", "training_set"]
