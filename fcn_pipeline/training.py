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

Data-parallel training (``train.nproc_per_node`` * ``train.nnodes`` processes, see
:mod:`fcn_pipeline.distributed`): every process holds the net wrapped in
DistributedDataParallel and steps on its ``batch_size // world size`` share of
the same global batches a single process would draw, so ``train.batch_size``
stays the global batch; validation splits the batches over the processes and sums
their confusion histograms. Only rank 0 logs and writes files.

``epochs.<variant>`` is the most epochs a stage runs (the poly schedule decays over
all of them); with ``train.plateau_patience`` > 0 it stops earlier once validation
mean IU has not beaten its best by ``train.plateau_min_gain`` for that many epochs.
``model.pt`` holds the weights of the best validation epoch (the first of equals),
``model_last.pt`` those of the last epoch run; the next staged variant starts from
the best.

Checkpoints hold only tensors and plain Python values and are read with
``torch.load(..., weights_only=True)``. A checkpoint is resumed only when it was
written by the same training configuration (params, data, initial model) and the
same arithmetic (device, thread count, autocast dtype, CPU instruction set); any
other checkpoint is ignored, with a line naming what differs, and training starts
over. A corrupt or foreign checkpoint is set aside (renamed ``*.bad``) with a warning.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fcn_pipeline import distributed
from fcn_pipeline.checkpoints import (
    CHECKPOINT_FILE,
    LAST_MODEL_FILE,
    MODEL_FILE,
    Progress,
    file_sha256,
    load_model,
    model_record,
    resume,
    run_fingerprint,
    runtime_record,
    save_checkpoint,
    save_file,
    weights_copy,
)
from fcn_pipeline.class_weights import load_class_weights
from fcn_pipeline.config import TrainParams, check_staged_variant
from fcn_pipeline.convergence import plateau_phases
from fcn_pipeline.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreloadedDataset,
    SegmentationDataset,
    eval_loader,
    preload,
    train_loader,
)
from fcn_pipeline.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    TrainingDivergedError,
    describe_os_error,
)
from fcn_pipeline.losses import SegmentationCriterion
from fcn_pipeline.metrics import segmentation_scores
from fcn_pipeline.models import build_fcn, init_from_coarser, parameter_groups
from fcn_pipeline.runtime import (
    autocast,
    kernel_settings,
    predict_batches,
    resolve_device,
    seed_everything,
    to_device,
    training_dtype,
)

# Steps between two reads of the training loss on CUDA (each one a synchronisation).
LOSS_CHECK_STEPS = 32

# Staged training: each variant starts from the trained model of the coarser one.
COARSER = {"fcn16s": "fcn32s", "fcn8s": "fcn16s"}

EpochCallback = Callable[[int, dict[str, float]], None]


# --- building blocks ----------------------------------------------------------------


def training_set(params: TrainParams) -> SegmentationDataset:
    """The images one epoch iterates over: the ingested train split or the patches."""
    root = params.data if params.mode == "full" else params.patches
    return SegmentationDataset(root, "train")


def build_criterion(
    params: TrainParams, class_names: list[str], cell_size: int
) -> SegmentationCriterion:
    """The loss of ``params``: class weights of ``train.class_weighting`` (read from the
    stats stage's output, which must list ``class_names``) and loss sampling."""
    weights = None
    if params.class_weighting != "none":
        array, _ = load_class_weights(params.stats, params.class_weighting, class_names)
        weights = torch.as_tensor(array, dtype=torch.float32)
    return SegmentationCriterion(
        class_weights=weights,
        loss_sampling=params.loss_sampling,
        cell_size=params.sampling_cell or cell_size,
    )


def build_model(
    params: TrainParams,
    net: str,
    class_names: list[str],
    init_path: Path | None,
    log: Callable[[str], None],
) -> nn.Module:
    """``net`` from the backbone (He-initialised or ``train.pretrained``), or staged from
    the coarser variant's trained model at ``init_path``."""
    pretrained = params.pretrained if init_path is None else None
    try:
        model = build_fcn(
            net,
            len(class_names),
            backbone=params.backbone,
            width=params.width,
            upsample=params.upsample,
            geometry=params.geometry,
            norm=params.norm,
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
        if (coarser.geometry, coarser.norm) != (params.geometry, params.norm):
            raise CheckpointError(
                f"{init_path}: a {coarser.geometry}/{coarser.norm} net cannot start a "
                f"train.geometry={params.geometry}, train.norm={params.norm} one; "
                "retrain the coarser variant"
            )
        try:
            init_from_coarser(model, coarser.state_dict())
        except ValueError as error:
            raise CheckpointError(f"{init_path}: {error}") from None
        log(f"{net}: initialised from {init_path}")
    return model


def build_optimizer(
    model: nn.Module, params: TrainParams, fused: bool | None = None
) -> torch.optim.Optimizer:
    """SGD with momentum or Adam over the reference's groups (biases at 2x lr, no decay).

    ``fused`` (default: when the weights are on CUDA) updates every weight in one
    kernel rather than a few per weight; the CPU keeps PyTorch's default loop, so CPU
    runs stay bit-identical to earlier ones."""
    groups = parameter_groups(model, params.lr, params.weight_decay)
    if fused is None:
        fused = next(model.parameters()).device.type == "cuda"
    options = {"fused": True} if fused else {}
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=params.momentum, **options)
    return torch.optim.Adam(groups, **options)


def poly_factor(step: int, total_steps: int, power: float) -> float:
    """``(1 - step / total_steps) ** power``, the FCN/DeepLab "poly" decay."""
    return (1.0 - min(step, total_steps) / max(total_steps, 1)) ** power


class PlateauScale:
    """The lr multiplier of the ``plateau`` schedule: ``plateau_factor`` to the number
    of drops so far, which :meth:`update` replays from the validation curve (so a
    resumed run, whose checkpoint holds the curve, continues at the same lr). Holds one
    float: LambdaLR saves a callable object's attributes in the checkpoint, which is
    read back with ``weights_only=True``."""

    def __init__(self) -> None:
        self.drops = 0
        self.value = 1.0

    def __call__(self, step: int) -> float:
        return self.value

    def update(self, history: list[dict[str, float]], params: TrainParams, scheduler: Any) -> bool:
        """Set the multiplier for ``history`` and apply it to the optimizer now; whether
        it changed."""
        drops, _ = plateau_phases([metrics["val_mean_iu"] for metrics in history], params)
        changed = drops != self.drops
        self.drops, self.value = drops, params.plateau_factor**drops
        for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * self.value
        return changed


def build_scheduler(
    optimizer: torch.optim.Optimizer, params: TrainParams, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning rate: ``poly`` decays each group's lr to 0 over ``total_steps``,
    ``fixed`` keeps it, ``plateau`` divides it at each plateau (its multiplier,
    :class:`PlateauScale`, is the scheduler's ``lr_lambdas[0]``: update it after every
    epoch). Call ``step()`` after every optimizer step."""
    if params.schedule == "poly":
        power = params.poly_power
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: poly_factor(step, total_steps, power)
        )
    if params.schedule == "plateau":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, PlateauScale())
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def random_hflip(images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each ``(3, H, W)`` image and its ``(H, W)`` mask left-right with probability 1/2
    (label-safe: a mirrored scene is labelled by the mirrored mask). Draws from torch's
    global CPU generator, which every epoch reseeds, so runs stay reproducible, and the
    draws are the same whatever device the batch is on."""
    flip = (torch.rand(images.shape[0]) < 0.5).to(images.device)
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    masks = torch.where(flip[:, None, None], masks.flip(-1), masks)
    return images, masks


def steps_per_epoch(train_set: SegmentationDataset, batch_size: int) -> int:
    """Optimizer steps in one epoch (incomplete last batches are dropped)."""
    return len(train_loader(train_set, batch_size, seed=0, workers=0, drop_last=True))


# --- one epoch ----------------------------------------------------------------------


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
    from tqdm import tqdm

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
        distributed.exit_if_test_kills()
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


# --- when to stop, what to keep ---------------------------------------------------


def best_epoch(history: list[dict[str, float]]) -> int:
    """The 1-based epoch of the highest validation mean IU (the first of equals)."""
    curve = [metrics["val_mean_iu"] for metrics in history]
    return 1 + curve.index(max(curve))


# --- the whole training -------------------------------------------------------------


@dataclass
class TrainResult:
    variant: str
    model_path: Path
    epochs: int  # epochs run (fewer than asked when stopped on a plateau)
    resumed_from: int  # epochs restored from the checkpoint (0 = fresh start)
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0  # the epoch whose weights model.pt holds (1-based)
    stopped_on_plateau: bool = False
    runtime: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, Any]:
        """What DVCLive records besides the curves: the best epoch and the stop."""
        best = self.history[self.best_epoch - 1] if self.best_epoch else {}
        return {
            "best_epoch": self.best_epoch,
            "best_val_mean_iu": best.get("val_mean_iu"),
            "epochs_run": self.epochs,
            "stopped_on_plateau": self.stopped_on_plateau,
            "precision": self.runtime.get("precision"),
        }


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


def train_variant(
    params: TrainParams,
    variant: str,
    epochs: int,
    *,
    on_epoch_end: EpochCallback | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``variant`` for ``epochs`` epochs with ``params``; write
    ``<out>/<variant>/model.pt``.

    ``variant`` is ``fcn32s``, ``fcn16s`` or ``fcn8s`` (``train.at_once`` turns
    ``fcn8s`` into FCN-8s trained at once from the backbone). FCN-16s starts from
    ``<out>/fcn32s/model.pt`` and FCN-8s from ``<out>/fcn16s/model.pt``.

    After every epoch the state is saved to ``<out>/<variant>/checkpoint.pt``; a
    rerun with the same configuration resumes after the last saved epoch, first
    replaying ``on_epoch_end(epoch, metrics)`` (1-based, :func:`epoch_metrics`) for
    the restored epochs so a logger that starts from scratch sees every epoch.

    Raises :class:`ConfigError`, :class:`DatasetError`, :class:`CheckpointError`
    or :class:`TrainingDivergedError` with a message naming the key or file;
    ``model.pt`` is written only after the last epoch, atomically.

    Started by a launcher of several processes (``torchrun``, ``srun``), every process
    calls this: they join one process group (``train.dist_timeout_s`` bounds every
    wait for a dead rank), and only rank 0 calls ``log`` and ``on_epoch_end`` and
    writes the checkpoint and ``model.pt`` while the others wait at a barrier.
    """
    check_staged_variant(variant)
    device = resolve_device(params.device)
    with distributed.process_group(device, params.dist_timeout_s) as world:
        if not world.main:  # rank 0 alone logs and writes
            log, on_epoch_end = (lambda line: None), None
        return _train(params, variant, epochs, device, world, on_epoch_end, log)


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps ``seed`` (a one-process run is unchanged); other ranks get their own
    stream, so their dropout, flips and loss-sampling masks differ, reproducibly."""
    return seed + rank * 2**40


def wrap_for_ranks(model: nn.Module, device: torch.device, world: distributed.World) -> nn.Module:
    """``model`` in DistributedDataParallel (gradients averaged over ranks) when there
    are several processes; ``model`` itself for one."""
    if not world.distributed:
        return model
    device_ids = [device.index if device.index is not None else world.local_rank]
    return DistributedDataParallel(model, device_ids=device_ids if device.type == "cuda" else None)


def _train(
    params: TrainParams,
    variant: str,
    epochs: int,
    device: torch.device,
    world: distributed.World,
    on_epoch_end: EpochCallback | None,
    log: Callable[[str], None],
) -> TrainResult:
    """:func:`train_variant` inside the process group of ``world``."""
    net = "fcn8s_atonce" if variant == "fcn8s" and params.at_once else variant
    out_dir = Path(params.out) / variant
    init_path = Path(params.out) / COARSER[net] / MODEL_FILE if net in COARSER else None
    data = build_data(params, device, world)
    backend = distributed.backend_for(device) if world.distributed else "one process"

    with kernel_settings(device, params.threads):
        dtype = training_dtype(device, params.precision)
        runtime = runtime_record(device, dtype)
        log(
            f"{net}: world size {world.size} ({backend}), {params.batch_size // world.size} "
            f"images per process per step, global batch {params.batch_size}, "
            + ", ".join(f"{key} {value}" for key, value in runtime.items())
        )
        seed_everything(params.seed)  # the same initial weights on every rank
        model = build_model(params, net, data.class_names, init_path, log)
        model.to(device, memory_format=torch.channels_last)
        criterion = build_criterion(params, data.class_names, model.output_stride)
        optimizer = build_optimizer(model, params)
        scheduler = build_scheduler(optimizer, params, data.steps_per_epoch * epochs)

        datasets = [data.train_set, data.val_set]
        fingerprint = run_fingerprint(params, net, epochs, datasets, init_path, world.size, runtime)
        checkpoint_path = out_dir / CHECKPOINT_FILE
        progress = resume(checkpoint_path, fingerprint, model, optimizer, scheduler, log, runtime)
        _rescale(scheduler, params, progress.history)
        start_epoch = progress.epoch
        for number, metrics in enumerate(progress.history, start=1):
            if on_epoch_end:
                on_epoch_end(number, metrics)
        stopped = _stopped(params, progress.history)
        if start_epoch and (stopped or start_epoch == epochs):
            log(
                f"{net}: {checkpoint_path} holds a finished run ({start_epoch} epochs); "
                "delete it to train afresh"
            )
        stepped = wrap_for_ranks(model, device, world)
        for epoch in range(start_epoch + 1, epochs + 1):
            if stopped:
                break
            # Every epoch reseeds from (seed, epoch), so a resumed run draws what an
            # uninterrupted one would (shuffle order, dropout, loss-sampling masks).
            epoch_seed = params.seed * 100_003 + epoch
            torch.manual_seed(rank_seed(epoch_seed, world.rank))
            criterion.reseed(rank_seed(epoch_seed, world.rank))
            loader = train_loader(
                data.train_set,
                params.batch_size,
                seed=epoch_seed,  # the same on every rank: they share the global batches
                workers=data_workers(data.train_set, params.workers),
                pin_memory=device.type == "cuda",
                drop_last=True,
                rank=world.rank,
                world_size=world.size,
            )
            stats = train_one_epoch(
                stepped,
                criterion,
                optimizer,
                scheduler,
                loader,
                device,
                epoch,
                hflip=params.hflip,
                dtype=dtype,
            )
            hist = evaluate(model, data.val_loader, len(data.class_names), device)
            progress.history.append(epoch_metrics(stats, segmentation_scores(hist)))
            if best_epoch(progress.history) == epoch:
                progress.best_state = weights_copy(model)
            stopped = _stopped(params, progress.history)
            if _rescale(scheduler, params, progress.history) and not stopped:
                log(
                    f"{net}: validation mean IU gained less than {params.plateau_min_gain} in "
                    f"{params.plateau_patience} epochs; lr x {params.plateau_factor} from "
                    f"epoch {epoch + 1}"
                )
            if world.main:
                save_checkpoint(
                    checkpoint_path, fingerprint, model, optimizer, scheduler, progress, runtime
                )
            distributed.barrier()
            log(epoch_line(net, epoch, epochs, progress.history[-1]))
            if on_epoch_end:
                on_epoch_end(epoch, progress.history[-1])
        if stopped:
            log(
                f"{net}: validation mean IU gained less than {params.plateau_min_gain} in "
                f"{params.plateau_patience} epochs; stopped after epoch {progress.epoch}"
            )

    model_path = out_dir / MODEL_FILE
    result = TrainResult(
        net,
        model_path,
        progress.epoch,
        resumed_from=start_epoch,
        history=progress.history,
        best_epoch=best_epoch(progress.history) if progress.history else 0,
        stopped_on_plateau=stopped,
        runtime=runtime,
    )
    if world.main:
        _save_models(model, progress, params, data, result)
    distributed.barrier()
    return result


def _stopped(params: TrainParams, history: list[dict[str, float]]) -> bool:
    return plateau_phases([metrics["val_mean_iu"] for metrics in history], params)[1]


def _rescale(
    scheduler: torch.optim.lr_scheduler.LRScheduler, params: TrainParams, history: list[dict]
) -> bool:
    """The ``plateau`` schedule's lr for the epochs after ``history`` (others: nothing);
    whether it dropped."""
    scale = getattr(scheduler, "lr_lambdas", [None])[0]
    return isinstance(scale, PlateauScale) and scale.update(history, params, scheduler)


def _save_models(
    model: nn.Module,
    progress: Progress,
    params: TrainParams,
    data: TrainingData,
    result: TrainResult,
) -> None:
    """``model.pt`` (the best epoch's weights) and ``model_last.pt`` (the last epoch's),
    each recording what it was trained on and how."""
    model = model.cpu()
    record = {
        "epochs": result.epochs,
        "history": progress.history,
        "mode": params.mode,
        "best_epoch": result.best_epoch,
        "last_epoch": result.epochs,
        "stopped_on_plateau": result.stopped_on_plateau,
        "runtime": result.runtime,
        "train_params": params.model_dump(),
        "data": {
            "source": data.val_set.meta.source,
            "dataset_json_sha256": file_sha256(data.val_set.root / "dataset.json"),
        },
        "class_colors": data.val_set.meta.class_colors,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    }
    last = model_record(model, data.class_names, epoch=result.epochs, **record)
    if progress.best_state is not None:
        model.load_state_dict(progress.best_state)
    best = model_record(model, data.class_names, epoch=result.best_epoch, **record)
    save_file(result.model_path.with_name(LAST_MODEL_FILE), last)
    save_file(result.model_path, best)


__all__ = [
    "COARSER",
    "EpochStats",
    "TrainResult",
    "best_epoch",
    "build_criterion",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "poly_factor",
    "run_fingerprint",
    "train_one_epoch",
    "train_variant",
]
