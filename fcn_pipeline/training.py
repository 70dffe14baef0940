"""Training FCN-32s, FCN-16s and FCN-8s, staged as in the paper (section 4.2).

Reads top to bottom like torchvision's segmentation reference: build the data,
build the model (from the coarser variant's trained model when staged), build
the optimizer, then per epoch ``train_one_epoch``, ``evaluate`` on the
validation split and save a checkpoint; a rerun resumes from that checkpoint.

``train.mode`` picks what an epoch iterates over: ``full`` trains on whole
images (batched by padding with the ignore label), ``patch`` on the patches
stage's output. The loss is the per-pixel cross-entropy of
:func:`fcn_pipeline.losses.segmentation_loss`, with ``train.class_weighting``
and loss sampling (each cell of the final coarse score grid is kept with
probability ``train.loss_sampling``, freshly drawn per step).

Loss sampling and batch size: with p < 1 only about p of the pixels of a batch
enter the loss, so a batch of B images gives about as many loss pixels as
B * p unsampled images. The paper compares at equal pixels per update by raising
the images per batch by 1/p; this module does not do that on its own, set
``train.batch_size`` accordingly (e.g. batch 16 with p = 0.5 against batch 8
with p = 1).

Checkpoints hold only tensors and plain Python values and are read with
``torch.load(..., weights_only=True)``. A checkpoint is resumed only when it was
written by the same training configuration (params, data, initial model); any
other checkpoint is ignored and training starts over.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fcn_pipeline.atomic import atomic_file
from fcn_pipeline.config import TrainParams, check_staged_variant
from fcn_pipeline.data import SegmentationDataset, eval_loader, train_loader
from fcn_pipeline.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    OutputError,
    TrainingDivergedError,
    describe_os_error,
)
from fcn_pipeline.losses import loss_sampling_mask, segmentation_loss
from fcn_pipeline.metrics import confusion_matrix, segmentation_scores
from fcn_pipeline.models import build_fcn, init_from_coarser, parameter_groups

MODEL_FILE = "model.pt"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FORMAT = "fcn-pipeline-model/1"
CHECKPOINT_FORMAT = "fcn-pipeline-checkpoint/1"
# Staged training: each variant starts from the trained model of the coarser one.
COARSER = {"fcn16s": "fcn32s", "fcn8s": "fcn16s"}

EpochCallback = Callable[[int, dict[str, float]], None]


# --- devices and determinism ----------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python-visible RNGs that training touches (torch CPU/CUDA, numpy)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


@contextmanager
def deterministic(device: torch.device, threads: int = 0) -> Iterator[None]:
    """Deterministic kernels (CPU always; CUDA where PyTorch has them) and the thread count,
    restored afterwards."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    old_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
        torch.set_num_threads(old_threads)


def autocast(device: torch.device) -> Any:
    """bfloat16 autocast on CUDA, nothing on CPU (full float32 keeps CPU runs exact)."""
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )


# --- model files ------------------------------------------------------------------


def load_file(path: str | Path, expected_format: str) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file raises many kinds
        raise CheckpointError(f"{path}: corrupt or not a PyTorch file ({error})") from None
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
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
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


# --- data ------------------------------------------------------------------------


def training_set(params: TrainParams) -> SegmentationDataset:
    """The images one epoch iterates over: the ingested train split or the patches."""
    root = params.data if params.mode == "full" else params.patches
    return SegmentationDataset(root, "train")


def class_weights_for(params: TrainParams, class_names: list[str]) -> torch.Tensor | None:
    """``(K,)`` float32 class weights of ``train.class_weighting`` from the stats output,
    or ``None`` for ``none``. The stats must list the same classes as the dataset."""
    from fcn_pipeline.stats import load_class_weights, read_stats

    if params.class_weighting == "none":
        return None
    stats_names = read_stats(params.stats)["class_names"]
    if list(stats_names) != list(class_names):
        raise DatasetError(
            f"{Path(params.stats) / 'stats.json'}: classes {stats_names} differ from the "
            f"dataset's {class_names}; re-run the stats stage"
        )
    weights = load_class_weights(params.stats, params.class_weighting)
    return torch.as_tensor(weights, dtype=torch.float32)


# --- one epoch ---------------------------------------------------------------------


def poly_factor(step: int, total_steps: int, power: float) -> float:
    """``(1 - step / total_steps) ** power``, the FCN/DeepLab "poly" decay."""
    return (1.0 - min(step, total_steps) / max(total_steps, 1)) ** power


def set_learning_rate(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group's lr = its initial lr (remembered on first use) times ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    data_seconds: float  # time the loop waited for the loader

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def show_progress() -> bool:
    """Progress bars on a terminal only; quiet in CI logs and under DVC/Prefect pipes."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    epoch: int,
    first_step: int,
    total_steps: int,
    params: TrainParams,
    class_weights: torch.Tensor | None,
    sampling_generator: torch.Generator,
) -> EpochStats:
    """One pass over ``loader``: forward, loss, backward, SGD/Adam step per batch.

    Raises :class:`TrainingDivergedError` naming the step and learning rate as soon
    as the loss is NaN or infinite.
    """
    from tqdm import tqdm

    model.train()
    cell = params.sampling_cell or model.output_stride
    total_loss, images, data_seconds = 0.0, 0, 0.0
    start = tick = time.perf_counter()
    bar = tqdm(
        loader, desc=f"{model.variant} epoch {epoch}", leave=False, disable=not show_progress()
    )
    for i, batch in enumerate(bar):
        data_seconds += time.perf_counter() - tick
        step = first_step + i
        if params.schedule == "poly":
            set_learning_rate(optimizer, poly_factor(step, total_steps, params.poly_power))
        x = batch.images.to(device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last)
        y = batch.masks.to(device, non_blocking=True)
        keep = None
        if params.loss_sampling < 1.0:
            keep = loss_sampling_mask(
                y.shape, cell, params.loss_sampling, generator=sampling_generator
            ).to(device, non_blocking=True)
        with autocast(device):
            logits = model(x)
        loss = segmentation_loss(logits, y, class_weights=class_weights, keep_mask=keep)
        value = loss.item()
        if not math.isfinite(value):
            lr = optimizer.param_groups[0]["lr"]
            raise TrainingDivergedError(
                f"{model.variant}: loss is {value} at step {step} (epoch {epoch}, batch {i}) "
                f"with learning rate {lr:.3g}; lower train.lr"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += value * len(batch.ids)
        images += len(batch.ids)
        bar.set_postfix(loss=f"{value:.4f}", img_s=f"{images / (time.perf_counter() - start):.1f}")
        tick = time.perf_counter()
    return EpochStats(
        loss=total_loss / max(images, 1),
        images=images,
        seconds=time.perf_counter() - start,
        data_seconds=data_seconds,
    )


@torch.no_grad()
def predict_batches(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    num_classes: int,
    device: torch.device,
    keep: set[int] | frozenset[int] = frozenset(),
) -> tuple[torch.Tensor, dict[int, np.ndarray]]:
    """The ``(K, K)`` int64 confusion histogram of ``model`` over ``loader`` (on CPU),
    and the ``(H, W)`` uint8 predictions of the dataset indices in ``keep``.

    ``loader`` must come from :func:`fcn_pipeline.data.eval_loader` (its batch
    sampler names the dataset indices of each batch).
    """
    model.eval()
    hist = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
    kept: dict[int, np.ndarray] = {}
    for indices, batch in zip(loader.batch_sampler, loader, strict=True):
        x = batch.images.to(device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            pred = model(x).argmax(dim=1)
        hist += confusion_matrix(pred, batch.masks.to(device, non_blocking=True), num_classes)
        for position, index in enumerate(indices):
            if index in keep:
                kept[index] = pred[position].to(torch.uint8).cpu().numpy()
    return hist.cpu(), kept


def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    num_classes: int,
    device: torch.device,
) -> torch.Tensor:
    """The ``(K, K)`` int64 confusion histogram of ``model`` over ``loader`` (on CPU)."""
    return predict_batches(model, loader, num_classes, device)[0]


# --- the whole training -------------------------------------------------------------


@dataclass
class TrainResult:
    variant: str
    model_path: Path
    epochs: int
    resumed_from: int  # epochs restored from the checkpoint (0 = fresh start)
    history: list[dict[str, float]] = field(default_factory=list)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_fingerprint(
    params: TrainParams,
    variant: str,
    datasets: list[SegmentationDataset],
    init_path: Path | None,
) -> str:
    """What a resumable checkpoint must match: the params that shape training, the
    variant, the data read (``dataset.json`` lists every shard) and the initial model."""
    settings = params.model_dump(exclude={"out", "live", "workers", "device", "eval_batch_size"})
    settings["epochs"] = params.epochs.get(variant, 0)
    parts = {
        "params": settings,
        "variant": variant,
        "data": [(dataset.root / "dataset.json").read_text() for dataset in datasets],
        "init": _sha256(init_path) if init_path else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def train_variant(
    params: TrainParams,
    variant: str,
    *,
    on_epoch_end: EpochCallback | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``variant`` with ``params``; write ``<out>/<variant>/model.pt``.

    ``variant`` is ``fcn32s``, ``fcn16s`` or ``fcn8s`` (``train.at_once`` turns
    ``fcn8s`` into FCN-8s trained at once from the backbone). FCN-16s starts from
    ``<out>/fcn32s/model.pt`` and FCN-8s from ``<out>/fcn16s/model.pt``.

    After every epoch the state is saved to ``<out>/<variant>/checkpoint.pt``; a
    rerun with the same configuration resumes after the last saved epoch. When it
    resumes, ``on_epoch_end`` is first called again for the restored epochs (with
    their saved metrics), so a logger that starts from scratch still sees every
    epoch. ``on_epoch_end(epoch, metrics)`` gets 1-based epochs and ``train_loss``,
    ``val_mean_iu``, ``val_pixel_acc``, ``val_mean_acc``, ``val_fw_iu``,
    ``images_per_second``, ``data_wait_share``, ``lr``, ``train_images``.

    Raises :class:`ConfigError`, :class:`DatasetError`, :class:`CheckpointError`
    or :class:`TrainingDivergedError` with a message naming the key or file;
    ``model.pt`` is written only after the last epoch, atomically.
    """
    check_staged_variant(variant)
    net = "fcn8s_atonce" if variant == "fcn8s" and params.at_once else variant
    if net not in params.epochs:
        raise ConfigError(f"train.epochs has no entry for {net!r}")
    epochs = params.epochs[net]
    device = resolve_device(params.device)
    out_dir = Path(params.out) / variant
    checkpoint_path = out_dir / CHECKPOINT_FILE

    # Data.
    train_set = training_set(params)
    val_set = SegmentationDataset(params.data, params.val_split)
    class_names = val_set.meta.class_names
    if train_set.meta.class_names != class_names:
        raise DatasetError(
            f"{train_set.root}: classes {train_set.meta.class_names} differ from "
            f"{val_set.root}'s {class_names}"
        )
    num_classes = len(class_names)
    class_weights = class_weights_for(params, class_names)
    if class_weights is not None:
        class_weights = class_weights.to(device)
    pin = device.type == "cuda"
    val_batches = eval_loader(
        val_set, params.eval_batch_size, workers=params.workers, pin_memory=pin
    )

    # Model: staged from the coarser variant's trained model, or from the backbone.
    init_path = None
    if net in COARSER:
        init_path = Path(params.out) / COARSER[net] / MODEL_FILE
    with deterministic(device, params.threads):
        seed_everything(params.seed)
        pretrained = params.pretrained if init_path is None else None
        try:
            model = build_fcn(
                net,
                num_classes,
                backbone=params.backbone,
                width=params.width,
                upsample=params.upsample,
                pretrained=pretrained,
            )
        except (OSError, ValueError) as error:  # the schema checked all but the file's content
            if pretrained is None:
                raise
            reason = describe_os_error(error, pretrained) if isinstance(error, OSError) else error
            raise CheckpointError(f"train.pretrained: {reason}") from None
        model.backbone.drop6.p = model.backbone.drop7.p = params.dropout
        if init_path is not None:
            coarser = load_model(init_path, class_names)
            try:
                init_from_coarser(model, coarser.state_dict())
            except ValueError as error:
                raise CheckpointError(f"{init_path}: {error}") from None
            log(f"{net}: initialised from {init_path}")
        # channels_last on the CPU too: oneDNN's NHWC convolutions train the default
        # width-0.0625 net 1.24x faster and predict 1.4-1.7x faster (on CUDA, cuDNN's).
        model.to(device, memory_format=torch.channels_last)

        # Optimizer: biases at 2x lr without decay (the reference's groups).
        groups = parameter_groups(model, params.lr, params.weight_decay)
        for group in groups:
            group["initial_lr"] = group["lr"]
        if params.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, momentum=params.momentum)
        else:
            optimizer = torch.optim.Adam(groups)

        # Resume.
        fingerprint = run_fingerprint(params, net, [train_set, val_set], init_path)
        start_epoch, history = 0, []
        if checkpoint_path.exists():
            state = load_file(checkpoint_path, CHECKPOINT_FORMAT)
            if state.get("fingerprint") == fingerprint:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                start_epoch, history = int(state["epoch"]), list(state["history"])
                log(f"{net}: resuming from {checkpoint_path} after epoch {start_epoch}/{epochs}")
                for number, metrics in enumerate(history, start=1):
                    if on_epoch_end:
                        on_epoch_end(number, metrics)
            else:
                log(f"{net}: {checkpoint_path} is from another configuration; starting over")

        steps_per_epoch = len(
            train_loader(train_set, params.batch_size, seed=0, workers=0, drop_last=True)
        )
        total_steps = steps_per_epoch * epochs
        sampling_generator = torch.Generator()
        for epoch in range(start_epoch + 1, epochs + 1):
            # Every epoch reseeds from (seed, epoch), so a resumed run draws what an
            # uninterrupted one would (shuffle order, dropout, loss-sampling masks).
            epoch_seed = params.seed * 100_003 + epoch
            torch.manual_seed(epoch_seed)
            sampling_generator.manual_seed(epoch_seed)
            loader = train_loader(
                train_set,
                params.batch_size,
                seed=epoch_seed,
                workers=params.workers,
                pin_memory=pin,
                drop_last=True,
            )
            stats = train_one_epoch(
                model,
                loader,
                optimizer,
                device=device,
                epoch=epoch,
                first_step=(epoch - 1) * steps_per_epoch,
                total_steps=total_steps,
                params=params,
                class_weights=class_weights,
                sampling_generator=sampling_generator,
            )
            scores = segmentation_scores(evaluate(model, val_batches, num_classes, device))
            metrics = {
                "train_loss": stats.loss,
                "train_images": stats.images,
                "val_mean_iu": scores["mean_iu"],
                "val_pixel_acc": scores["pixel_acc"],
                "val_mean_acc": scores["mean_acc"],
                "val_fw_iu": scores["fw_iu"],
                "images_per_second": stats.images_per_second,
                "data_wait_share": stats.data_seconds / max(stats.seconds, 1e-9),
                "lr": optimizer.param_groups[0]["lr"],
            }
            history.append(metrics)
            save_file(
                checkpoint_path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "fingerprint": fingerprint,
                    "variant": net,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "history": history,
                },
            )
            log(
                f"{net} epoch {epoch}/{epochs}: loss {stats.loss:.4f}, val mean IU "
                f"{scores['mean_iu']:.4f}, pixel acc {scores['pixel_acc']:.4f}, "
                f"{stats.images_per_second:.1f} img/s, data wait "
                f"{100 * metrics['data_wait_share']:.0f}%"
            )
            if on_epoch_end:
                on_epoch_end(epoch, metrics)

    model_path = out_dir / MODEL_FILE
    save_file(
        model_path,
        model_record(
            model.cpu(),
            class_names,
            epochs=epochs,
            history=history,
            mode=params.mode,
        ),
    )
    return TrainResult(
        variant=net,
        model_path=model_path,
        epochs=epochs,
        resumed_from=start_epoch,
        history=history,
    )


__all__ = [
    "CHECKPOINT_FILE",
    "COARSER",
    "MODEL_FILE",
    "EpochStats",
    "TrainResult",
    "evaluate",
    "load_model",
    "model_record",
    "poly_factor",
    "predict_batches",
    "resolve_device",
    "run_fingerprint",
    "train_one_epoch",
    "train_variant",
]
