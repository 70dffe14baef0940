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

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
from fcn_pipeline.data import IMAGENET_MEAN, IMAGENET_STD, train_loader
from fcn_pipeline.epoch import EpochStats, epoch_line, epoch_metrics, evaluate, train_one_epoch
from fcn_pipeline.errors import CheckpointError, describe_os_error
from fcn_pipeline.losses import SegmentationCriterion
from fcn_pipeline.metrics import segmentation_scores
from fcn_pipeline.models import build_fcn, init_from_coarser, parameter_groups
from fcn_pipeline.runtime import (
    kernel_settings,
    resolve_device,
    seed_everything,
    training_dtype,
)
from fcn_pipeline.schedules import build_scheduler, rescale, stopped
from fcn_pipeline.train_data import TrainingData, build_data, data_workers

# Staged training: each variant starts from the trained model of the coarser one.
COARSER = {"fcn16s": "fcn32s", "fcn8s": "fcn16s"}

EpochCallback = Callable[[int, dict[str, float]], None]


# --- building blocks ----------------------------------------------------------------


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


def train_variant(
    params: TrainParams,
    variant: str,
    epochs: int,
    *,
    on_epoch_end: EpochCallback | None = None,
    log: Callable[[str], None] = print,
    resume_from: Path | None = None,
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
    ``resume_from``: a checkpoint to resume from where that one is missing or of
    another configuration (one a killed study kept aside); it is copied there.

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
        return _train(params, variant, epochs, device, world, on_epoch_end, log, resume_from)


@dataclass
class _Run:
    """One training between its epochs: the net, its optimisation and its progress."""

    net: str
    model: nn.Module
    stepped: nn.Module  # the model, in DistributedDataParallel when there are ranks
    criterion: SegmentationCriterion
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    dtype: torch.dtype
    runtime: dict[str, Any]
    fingerprint: dict[str, Any]
    checkpoint_path: Path
    progress: Progress


def _train(
    params: TrainParams,
    variant: str,
    epochs: int,
    device: torch.device,
    world: distributed.World,
    on_epoch_end: EpochCallback | None,
    log: Callable[[str], None],
    resume_from: Path | None = None,
) -> TrainResult:
    """:func:`train_variant` inside the process group of ``world``."""
    net = "fcn8s_atonce" if variant == "fcn8s" and params.at_once else variant
    out_dir = Path(params.out) / variant
    init_path = Path(params.out) / COARSER[net] / MODEL_FILE if net in COARSER else None
    data = build_data(params, device, world)
    with kernel_settings(device, params.threads):
        run = _start(params, net, epochs, device, world, data, (init_path, resume_from),
                     out_dir, log)  # fmt: skip
        progress, start_epoch = run.progress, run.progress.epoch
        for number, metrics in enumerate(progress.history, start=1):
            if on_epoch_end:
                on_epoch_end(number, metrics)
        stop = stopped(params, progress.history)
        if start_epoch and (stop or start_epoch == epochs):
            log(
                f"{net}: {run.checkpoint_path} holds a finished run ({start_epoch} epochs); "
                "delete it to train afresh"
            )
        for epoch in range(start_epoch + 1, epochs + 1):
            if stop:
                break
            stop = _epoch(run, params, data, epoch, device, world, log)
            log(epoch_line(net, epoch, epochs, progress.history[-1]))
            if on_epoch_end:
                on_epoch_end(epoch, progress.history[-1])
        if stop:
            log(
                f"{net}: validation mean IU gained less than {params.plateau_min_gain} in "
                f"{params.plateau_patience} epochs; stopped after epoch {progress.epoch}"
            )
    result = TrainResult(
        net,
        out_dir / MODEL_FILE,
        progress.epoch,
        resumed_from=start_epoch,
        history=progress.history,
        best_epoch=best_epoch(progress.history) if progress.history else 0,
        stopped_on_plateau=stop,
        runtime=run.runtime,
    )
    if world.main:
        _save_models(run.model, progress, params, data, result)
    distributed.barrier()
    return result


def _start(
    params: TrainParams, net: str, epochs: int, device: torch.device, world: distributed.World,
    data: TrainingData, paths: tuple[Path | None, Path | None], out_dir: Path,
    log: Callable[[str], None],
) -> _Run:  # fmt: skip
    """Everything before the first epoch: the net (from the backbone or the coarser
    net), its loss, optimizer and schedule, resumed from the checkpoint when it is
    this configuration's. ``paths``: the initial weights (the coarser net's model, if
    any) and the checkpoint to resume from where the net's own is not this run's."""
    init_path, resume_from = paths
    backend = distributed.backend_for(device) if world.distributed else "one process"
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
    progress = resume(checkpoint_path, fingerprint, model, optimizer, scheduler, log, runtime,
                      resume_from)  # fmt: skip
    rescale(scheduler, params, progress.history)
    stepped = distributed.wrap_for_ranks(model, device, world)
    return _Run(net, model, stepped, criterion, optimizer, scheduler, dtype, runtime,
                fingerprint, checkpoint_path, progress)  # fmt: skip


def _epoch(
    run: _Run, params: TrainParams, data: TrainingData, epoch: int, device: torch.device,
    world: distributed.World, log: Callable[[str], None],
) -> bool:  # fmt: skip
    """Train and validate epoch ``epoch`` and save the checkpoint; whether the plateau
    rule ends the stage here."""
    # Every epoch reseeds from (seed, epoch), so a resumed run draws what an
    # uninterrupted one would (shuffle order, dropout, loss-sampling masks).
    epoch_seed = params.seed * 100_003 + epoch
    torch.manual_seed(distributed.rank_seed(epoch_seed, world.rank))
    run.criterion.reseed(distributed.rank_seed(epoch_seed, world.rank))
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
    stats = train_one_epoch(run.stepped, run.criterion, run.optimizer, run.scheduler, loader,
                            device, epoch, hflip=params.hflip, dtype=run.dtype)  # fmt: skip
    hist = evaluate(run.model, data.val_loader, len(data.class_names), device)
    history = run.progress.history
    history.append(epoch_metrics(stats, segmentation_scores(hist)))
    if best_epoch(history) == epoch:
        run.progress.best_state = weights_copy(run.model)
    stop = stopped(params, history)
    if rescale(run.scheduler, params, history) and not stop:
        log(
            f"{run.net}: validation mean IU gained less than {params.plateau_min_gain} in "
            f"{params.plateau_patience} epochs; lr x {params.plateau_factor} from "
            f"epoch {epoch + 1}"
        )
    if world.main:
        save_checkpoint(run.checkpoint_path, run.fingerprint, run.model, run.optimizer,
                        run.scheduler, run.progress, run.runtime)  # fmt: skip
    distributed.barrier()
    return stop


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
    "run_fingerprint",
    "train_variant",
]
