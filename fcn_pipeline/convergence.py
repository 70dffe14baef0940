"""When training has stopped gaining: the plateau rule that ends a stage or lowers its
learning rate, and the flatness rule that says whether a run has converged.

Both read a validation mean IU curve, one value per epoch. Training uses them to stop
(:func:`plateau_phases`), studies to report whether each run converged
(:func:`converged`); with ``train.schedule: plateau`` the last phase runs until the
stage's own curve is flat by the same rule the studies apply.
"""

from __future__ import annotations

import numpy as np

from fcn_pipeline.config import TrainParams

# A run has converged (its curve is flat) when the mean validation mean IU over the last
# FLAT_SHARE of its epochs beats the mean over the FLAT_SHARE before by less than FLAT_GAIN.
# A staged run is judged on its scored net's own training (FCN-8s's epochs): the nets
# before it are its initialisation, and their epochs would only stretch the windows.
FLAT_SHARE = 0.2
FLAT_GAIN = 0.01
FLAT_RULE = (
    f"a run has converged when the validation mean IU of its scored net, averaged over "
    f"the last fifth of that net's training epochs, exceeds the average over the fifth "
    f"before by less than {FLAT_GAIN}"
)


def plateau_reached(curve: list[float], patience: int, min_gain: float) -> bool:
    """Whether the last ``patience`` values of ``curve`` all stayed below the best value
    before them plus ``min_gain`` (``patience`` 0: never)."""
    if patience <= 0 or len(curve) <= patience:
        return False
    return max(curve[-patience:]) < max(curve[:-patience]) + min_gain


def plateau_phases(curve: list[float], params: TrainParams) -> tuple[int, bool]:
    """Replay the plateau rule over a validation curve: the lr drops so far and whether
    the stage stops. Without the ``plateau`` schedule the first plateau stops it; with it,
    each of the first ``plateau_drops`` plateaus is a drop, a plateau needs
    ``plateau_patience`` epochs since the last drop (at the new lr) to count, and the
    stage ends at a plateau after the last drop once the curve is also flat by
    :data:`FLAT_RULE`, so that a study finds it converged."""
    patience, gain = params.plateau_patience, params.plateau_min_gain
    allowed = params.plateau_drops if params.schedule == "plateau" else 0
    drops, since = 0, 0
    for end in range(1, len(curve) + 1):
        if end - since < patience or not plateau_reached(curve[:end], patience, gain):
            continue
        if drops < allowed:
            drops, since = drops + 1, end
        elif params.schedule != "plateau" or converged(curve[:end]):
            return drops, True
    return drops, False


def flat_gain(values: list[float]) -> float | None:
    """Mean of the last fifth of ``values`` minus the mean of the fifth before it (at
    least one value each); None for fewer than two values."""
    part = max(1, int(len(values) * FLAT_SHARE))
    if len(values) < 2 * part or len(values) < 2:
        return None
    return float(np.mean(values[-part:]) - np.mean(values[-2 * part : -part]))


def converged(values: list[float]) -> bool:
    """Whether a validation curve is flat by :data:`FLAT_RULE`."""
    gain = flat_gain(values)
    return gain is not None and gain < FLAT_GAIN


__all__ = [
    "FLAT_GAIN",
    "FLAT_RULE",
    "FLAT_SHARE",
    "converged",
    "flat_gain",
    "plateau_phases",
    "plateau_reached",
]
