"""The learning-rate schedules of training and the plateau stop.

``poly`` decays each group's lr to 0 over the stage's steps (FCN, DeepLab), ``fixed``
keeps it, ``plateau`` multiplies it by ``train.plateau_factor`` at each of the first
``train.plateau_drops`` plateaus of validation mean IU and ends the stage at the next
(:mod:`fcn_pipeline.convergence` decides what a plateau is).
"""

from __future__ import annotations

from typing import Any

import torch

from fcn_pipeline.config import TrainParams
from fcn_pipeline.convergence import plateau_phases


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


def stopped(params: TrainParams, history: list[dict[str, float]]) -> bool:
    """Whether the plateau rule of ``params`` ends the stage after ``history``."""
    return plateau_phases([metrics["val_mean_iu"] for metrics in history], params)[1]


def rescale(
    scheduler: torch.optim.lr_scheduler.LRScheduler, params: TrainParams, history: list[dict]
) -> bool:
    """The ``plateau`` schedule's lr for the epochs after ``history`` (others: nothing);
    whether it dropped."""
    scale = getattr(scheduler, "lr_lambdas", [None])[0]
    return isinstance(scale, PlateauScale) and scale.update(history, params, scheduler)


__all__ = ["PlateauScale", "build_scheduler", "poly_factor", "rescale", "stopped"]
