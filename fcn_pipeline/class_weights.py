"""Class weights: the formulas, and reading them back from a stats directory.

The stats stage counts the train split and writes the weights of every scheme
into ``stats.json``; training and the patches stage read them with
:func:`load_class_weights`, which checks the file once (present, well formed,
describing the same classes) and returns the weights of one scheme. This module
is all that those stages need of the statistics, so a change to how the stats
stage counts or plots does not make DVC retrain.

Schemes (``K`` classes, ``n_c`` labelled train pixels of class ``c``, ``N`` all
labelled train pixels):

- ``median_frequency`` (Eigen and Fergus 2015, SegNet): ``freq(c) = n_c /
  image_pixels_with_class[c]`` (labelled pixels of the images that contain ``c``),
  ``w_c = median(freq) / freq(c)``, the median taken over the classes present;
- ``inverse_frequency``: ``w_c = N / (K' n_c)`` with ``K'`` the number of classes
  present, i.e. scaled so that the pixel-weighted mean weight is exactly 1;
- ``enet`` (Paszke et al. 2016): ``w_c = 1 / ln(1.02 + n_c / N)``;
- ``none``: all ones.

A class absent from train gets weight 0 in the three computed schemes (it can
never appear in a training target) and 1 in ``none``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fcn_pipeline.errors import ConfigError, DatasetError

# The one list of weighting schemes (config.WeightScheme is built from it).
SCHEMES: tuple[str, ...] = ("median_frequency", "inverse_frequency", "enet", "none")
WEIGHTS_SPLIT = "train"  # the split the weights are computed on
STATS_FILE = "stats.json"
ENET_C = 1.02  # ENet's constant: bounds the weight of the rarest classes near 50


def median_frequency_weights(pixels: np.ndarray, image_pixels_with_class: np.ndarray) -> np.ndarray:
    """Median-frequency balancing: ``(K,)`` float64, ``median(freq) / freq(c)``, 0 if absent."""
    present = pixels > 0
    weights = np.zeros(len(pixels))
    if present.any():
        freq = pixels[present] / image_pixels_with_class[present]
        weights[present] = np.median(freq) / freq
    return weights


def inverse_frequency_weights(pixels: np.ndarray) -> np.ndarray:
    """Inverse frequency: ``(K,)`` float64, ``N / (K' n_c)``, 0 if absent.

    Normalised so the pixel-weighted mean weight over the split is exactly 1.
    """
    present = pixels > 0
    weights = np.zeros(len(pixels))
    if present.any():
        weights[present] = pixels.sum() / (present.sum() * pixels[present])
    return weights


def enet_weights(pixels: np.ndarray, c: float = ENET_C) -> np.ndarray:
    """ENet weighting: ``(K,)`` float64, ``1 / ln(c + p_c)``, 0 if absent."""
    present = pixels > 0
    weights = np.zeros(len(pixels))
    weights[present] = 1.0 / np.log(c + pixels[present] / pixels.sum())
    return weights


def scheme_weights(
    scheme: str, pixels: np.ndarray, image_pixels_with_class: np.ndarray
) -> np.ndarray:
    """The ``(K,)`` float64 weights of ``scheme`` (one of :data:`SCHEMES`) from the
    ``(K,)`` int64 per-class counts of the train split."""
    if scheme == "median_frequency":
        return median_frequency_weights(pixels, image_pixels_with_class)
    if scheme == "inverse_frequency":
        return inverse_frequency_weights(pixels)
    if scheme == "enet":
        return enet_weights(pixels)
    if scheme == "none":
        return np.ones(len(pixels))
    raise ConfigError(f"unknown class-weighting scheme {scheme!r}; expected one of {SCHEMES}")


def read_stats(stats_dir: str | Path) -> dict[str, Any]:
    """Read and check ``stats.json`` of a stats directory.

    Raises :class:`DatasetError` naming the path when it is missing, not JSON,
    or lacks the class names, the train counts or a weighting scheme.
    """
    path = Path(stats_dir) / STATS_FILE
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing (run the stats stage)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path}: not readable JSON: {error}") from None
    try:
        names = summary["class_names"]
        weights = summary["weights"]
        missing = [scheme for scheme in SCHEMES if scheme not in weights]
        bad = [s for s, w in weights.items() if not isinstance(w, list) or len(w) != len(names)]
        int(summary["splits"][WEIGHTS_SPLIT]["images"])
        len(summary["splits"][WEIGHTS_SPLIT]["pixels"])
    except (KeyError, TypeError, ValueError) as error:
        raise DatasetError(f"{path}: malformed statistics ({error!r})") from None
    if missing or bad:
        raise DatasetError(
            f"{path}: weights missing for {missing} or of the wrong length for {bad}; "
            "re-run the stats stage"
        )
    return summary


def load_class_weights(
    stats_dir: str | Path,
    scheme: str,
    class_names: list[str],
    *,
    train_images: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The ``(K,)`` float64 weights of ``scheme`` stored in ``stats_dir``, and the
    checked ``stats.json`` content.

    The statistics must describe ``class_names`` (and, when given, a train split
    of ``train_images`` images): otherwise :class:`DatasetError` names the file
    and says to re-run the stats stage. An unknown ``scheme`` is a
    :class:`ConfigError`; weights that are not finite and >= 0 a :class:`DatasetError`.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown class-weighting scheme {scheme!r}; expected one of {SCHEMES}")
    stats = read_stats(stats_dir)
    path = Path(stats_dir) / STATS_FILE
    if list(stats["class_names"]) != list(class_names):
        raise DatasetError(
            f"{path}: classes {stats['class_names']} differ from the dataset's "
            f"{list(class_names)}; re-run the stats stage"
        )
    counted = int(stats["splits"][WEIGHTS_SPLIT]["images"])
    if train_images is not None and counted != train_images:
        raise DatasetError(
            f"{path}: counts {counted} {WEIGHTS_SPLIT} images, the dataset has "
            f"{train_images}; re-run the stats stage"
        )
    weights = np.asarray(stats["weights"][scheme], dtype=np.float64)
    if not np.all(np.isfinite(weights)) or (weights < 0).any():
        raise DatasetError(f"{path}: {scheme} weights are not finite >= 0")
    return weights, stats


__all__ = [
    "ENET_C",
    "SCHEMES",
    "STATS_FILE",
    "WEIGHTS_SPLIT",
    "enet_weights",
    "inverse_frequency_weights",
    "load_class_weights",
    "median_frequency_weights",
    "read_stats",
    "scheme_weights",
]
