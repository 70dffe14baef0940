"""One epoch of training steps, validation, and what is logged per epoch."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from fcn_pipeline import distributed
from fcn_pipeline.errors import TrainingDivergedError
from fcn_pipeline.losses import SegmentationCriterion
from fcn_pipeline.runtime import autocast, predict_batches, to_device, training_dtype

# Steps between two reads of the training loss on CUDA (each one a synchronisation).
LOSS_CHECK_STEPS = 32


def random_hflip(images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each ``(3, H, W)`` image and its ``(H, W)`` mask left-right with probability 1/2
    (label-safe: a mirrored scene is labelled by the mirrored mask). Draws from torch's
    global CPU generator, which every epoch reseeds, so runs stay reproducible, and the
    draws are the same whatever device the batch is on."""
    flip = (torch.rand(images.shape[0]) < 0.5).to(images.device)
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    masks = torch.where(flip[:, None, None], masks.flip(-1), masks)
    return images, masks


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    data_seconds: float  # time the loop waited for the loader
    lr: float  # learning rate of the epoch's last step (first group)

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def show_progress() -> bool:
    """Progress bars on a terminal only; quiet in CI logs and under DVC/Prefect pipes."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def train_one_epoch(
    model: nn.Module,
    criterion: SegmentationCriterion,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    epoch: int,
    *,
    hflip: bool = False,
    loss_check_steps: int | None = None,
    dtype: torch.dtype | None = None,
) -> EpochStats:
    """One pass over ``loader``: forward, loss, backward, optimizer and scheduler step
    (``hflip``: each image mirrored with probability 1/2 first; the forward pass under
    autocast to ``dtype``, default :func:`fcn_pipeline.runtime.training_dtype`).

    The losses are read back every ``loss_check_steps`` steps (default: every step on
    the CPU, ``LOSS_CHECK_STEPS`` on CUDA, where each read is a synchronisation that
    would leave the device idle while the host queues the next step). Raises
    :class:`TrainingDivergedError` naming the step and learning rate of the first NaN
    or infinite loss, at the read that finds it.
    """
    variant = getattr(model, "module", model).variant  # under DistributedDataParallel
    model.train()
    total_loss, images, data_seconds, lr = 0.0, 0, 0.0, optimizer.param_groups[0]["lr"]
    if loss_check_steps is None:
        loss_check_steps = 1 if device.type == "cpu" else LOSS_CHECK_STEPS
    dtype = training_dtype(device) if dtype is None else dtype
    pending: list[tuple[torch.Tensor, int, int, float, int]] = []  # loss, step, batch, lr, n
    start = tick = time.perf_counter()
    bar = tqdm(loader, desc=f"{variant} epoch {epoch}", leave=False, disable=not show_progress())

    def settle() -> None:
        """Read the pending losses back; raise at the first one that is not finite."""
        nonlocal total_loss
        values = torch.stack([entry[0] for entry in pending]).tolist()
        for value, (_, step, batch_index, step_lr, count) in zip(values, pending, strict=True):
            if not math.isfinite(value):
                raise TrainingDivergedError(
                    f"{variant}: loss is {value} at step {step} (epoch {epoch}, batch "
                    f"{batch_index}) with learning rate {step_lr:.3g}; lower train.lr"
                )
            total_loss += value * count
        pending.clear()
        bar.set_postfix(
            loss=f"{values[-1]:.4f}", img_s=f"{images / (time.perf_counter() - start):.1f}"
        )

    for i, batch in enumerate(bar):
        data_seconds += time.perf_counter() - tick
        lr = optimizer.param_groups[0]["lr"]
        # Flipped where they will be used: on CUDA the pinned batch goes over as it came
        # from the loader and the GPU flips it, rather than the host, into pageable memory.
        x, y = to_device(batch.images, device), batch.masks.to(device, non_blocking=True)
        if hflip:
            x, y = random_hflip(x, y)
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            logits = model(x)
        loss = criterion(logits, y)
        images += len(batch.ids)
        pending.append((loss.detach(), scheduler.last_epoch, i, lr, len(batch.ids)))
        if len(pending) >= loss_check_steps:
            settle()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        tick = time.perf_counter()
    if pending:
        settle()
    # Over all ranks: the mean loss of every image of the epoch, and all images seen.
    totals = distributed.all_reduce_sum(torch.tensor([total_loss, float(images)]))
    total_loss, images = float(totals[0]), int(totals[1])
    return EpochStats(
        loss=total_loss / max(images, 1),
        images=images,
        seconds=time.perf_counter() - start,
        data_seconds=data_seconds,
        lr=lr,
    )


def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    num_classes: int,
    device: torch.device,
) -> torch.Tensor:
    """The ``(K, K)`` int64 confusion histogram of ``model`` over ``loader`` (on CPU),
    summed over all ranks when each holds a share of the batches (exact: integers)."""
    return distributed.all_reduce_sum(predict_batches(model, loader, num_classes, device)[0])


def epoch_line(net: str, epoch: int, epochs: int, metrics: dict[str, float]) -> str:
    """One log line per epoch: loss, validation scores, speed and data wait."""
    return (
        f"{net} epoch {epoch}/{epochs}: loss {metrics['train_loss']:.4f}, val mean IU "
        f"{metrics['val_mean_iu']:.4f}, pixel acc {metrics['val_pixel_acc']:.4f}, "
        f"{metrics['images_per_second']:.1f} img/s, data wait "
        f"{100 * metrics['data_wait_share']:.0f}%"
    )


def epoch_metrics(stats: EpochStats, scores: dict) -> dict[str, float]:
    """What is logged per epoch: training loss and speed, validation scores, lr."""
    return {
        "train_loss": stats.loss,
        "train_images": stats.images,
        "val_mean_iu": scores["mean_iu"],
        "val_pixel_acc": scores["pixel_acc"],
        "val_mean_acc": scores["mean_acc"],
        "val_fw_iu": scores["fw_iu"],
        "images_per_second": stats.images_per_second,
        "data_wait_share": stats.data_seconds / max(stats.seconds, 1e-9),
        "lr": stats.lr,
    }


__all__ = [
    "LOSS_CHECK_STEPS",
    "EpochStats",
    "epoch_line",
    "epoch_metrics",
    "evaluate",
    "random_hflip",
    "train_one_epoch",
]
