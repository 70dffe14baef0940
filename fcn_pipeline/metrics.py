"""Segmentation metrics of the FCN paper, computed from a confusion histogram.

The histogram ``hist[i, j]`` counts pixels of ground-truth class ``i`` predicted as
class ``j``; pixels labelled ``ignore_index`` never enter it. Histograms add up, so
an evaluation loop accumulates one per batch and scores the sum once at the end.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["confusion_matrix", "segmentation_scores"]


def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Count (ground truth, prediction) pairs over all non-ignored pixels.

    Args:
        pred: predicted class ids, any integer dtype, any shape (e.g. ``(N, H, W)``).
        target: ground-truth class ids, integer dtype, same shape and device as ``pred``.
        num_classes: ``K``, the number of classes (ids ``0 .. K-1``).
        ignore_index: target value whose pixels are dropped (their prediction is
            not looked at).
        validate: check that every counted target and prediction lies in
            ``[0, K)``. The check reads values back to the host, i.e. it
            synchronises with a GPU; a hot training/evaluation loop on GPU whose
            inputs are known to be valid (an ``argmax`` over ``K`` logits and
            checked labels) may pass ``validate=False``. Without validation,
            out-of-range values give an unspecified result: they may raise or be
            miscounted. Note that ``torch.bincount`` on CUDA still reads its
            input's maximum to size the output, so one synchronisation remains.

    Returns:
        ``(K, K)`` int64 tensor on the inputs' device; rows are ground truth,
        columns are predictions.

    Raises:
        TypeError: a non-integer input.
        ValueError: shapes or devices differ, ``num_classes < 1``, or (when
            validating) a counted target or prediction outside ``[0, K)``; the
            message names the offending value.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got pred {tuple(pred.shape)} "
            f"and target {tuple(target.shape)}"
        )
    if pred.device != target.device:
        raise ValueError(f"pred is on {pred.device} but target is on {target.device}")
    for name, tensor in (("pred", pred), ("target", target)):
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {tensor.dtype}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")

    k = num_classes
    # int64 before arithmetic: uint8 labels (ignore 255) would overflow target * K.
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    counted = target != ignore_index

    if validate:
        bad_target = counted & ((target < 0) | (target >= k))
        if bad_target.any():
            value = int(target[bad_target][0])
            raise ValueError(
                f"target value {value} is outside [0, {k}) and is not ignore_index ({ignore_index})"
            )
        bad_pred = counted & ((pred < 0) | (pred >= k))
        if bad_pred.any():
            value = int(pred[bad_pred][0])
            raise ValueError(f"pred value {value} is outside [0, {k})")

    # Ignored pixels go to one extra bin that is dropped afterwards; unlike
    # boolean indexing (target[counted]) this needs no data-dependent shape.
    index = torch.where(counted, target * k + pred, k * k)
    counts = torch.bincount(index, minlength=k * k + 1)
    if counts.numel() != k * k + 1:
        # Only reachable with validate=False; the length is host metadata, so free to check.
        raise ValueError(f"target or pred has a value >= num_classes ({k})")
    return counts[: k * k].reshape(k, k)


def segmentation_scores(hist: torch.Tensor | np.ndarray) -> dict[str, float | list[float]]:
    """FCN's four scores (and their per-class parts) from a confusion histogram.

    With ``n_ij`` pixels of true class ``i`` predicted as ``j``, ``t_i = sum_j n_ij``
    and ``IU_i = n_ii / (t_i + sum_j n_ji - n_ii)`` (FCN paper, section 5):

    - ``pixel_acc = sum_i n_ii / sum_i t_i``
    - ``mean_acc``: mean of ``n_ii / t_i`` over classes with ground-truth pixels.
    - ``mean_iu``: mean of ``IU_i`` over classes with ground-truth or predicted
      pixels; a class predicted but absent from the ground truth has ``IU = 0``
      and counts.
    - ``fw_iu = sum_i t_i * IU_i / sum_k t_k`` over classes with ground-truth pixels.

    Undefined ratios are NaN, as in the reference's NaN-aware mean; an all-zero
    histogram gives NaN everywhere. Computed in float64.

    Args:
        hist: ``(K, K)`` histogram (rows ground truth, columns prediction), a tensor
            (any real dtype, any device, e.g. from :func:`confusion_matrix`) or a
            NumPy array (as the reference's ``score.py`` accumulates it).

    Returns:
        ``pixel_acc``, ``mean_acc``, ``mean_iu``, ``fw_iu`` as Python floats and
        ``per_class_iu``, ``per_class_acc`` as lists of ``K`` Python floats.

    Raises:
        TypeError: ``hist`` is neither a tensor nor a NumPy array.
        ValueError: ``hist`` is not a square 2-D tensor.
    """
    if isinstance(hist, np.ndarray):
        hist = torch.from_numpy(hist)
    if not isinstance(hist, torch.Tensor):
        raise TypeError(
            f"hist must be a (K, K) torch.Tensor or numpy.ndarray, got {type(hist).__name__}"
        )
    if hist.dim() != 2 or hist.shape[0] != hist.shape[1]:
        raise ValueError(f"hist must be a square (K, K) tensor, got shape {tuple(hist.shape)}")

    hist = hist.detach().to(device="cpu", dtype=torch.float64)
    nan = torch.tensor(math.nan, dtype=torch.float64)
    true_positives = hist.diagonal()
    gt_pixels = hist.sum(dim=1)  # t_i
    pred_pixels = hist.sum(dim=0)  # sum_j n_ji
    union = gt_pixels + pred_pixels - true_positives
    total = gt_pixels.sum()

    per_class_acc = torch.where(gt_pixels > 0, true_positives / gt_pixels, nan)
    per_class_iu = torch.where(union > 0, true_positives / union, nan)
    has_gt = gt_pixels > 0

    if total > 0:
        pixel_acc = float(true_positives.sum() / total)
        # Classes with ground truth always have a defined IU, so the sum has no NaN.
        fw_iu = float((gt_pixels[has_gt] * per_class_iu[has_gt]).sum() / total)
    else:
        pixel_acc = fw_iu = math.nan

    # nanmean of an all-NaN tensor is NaN (no warning, unlike numpy).
    return {
        "pixel_acc": pixel_acc,
        "mean_acc": float(per_class_acc.nanmean()),
        "mean_iu": float(per_class_iu.nanmean()),
        "fw_iu": fw_iu,
        "per_class_iu": per_class_iu.tolist(),
        "per_class_acc": per_class_acc.tolist(),
    }
