"""The FCN training loss: per-pixel softmax cross-entropy, with the two tools that
let whole-image training do what patchwise training does (FCN paper, section 4.4):
class weighting (rare classes count more) and loss sampling (random cells of the
coarse score grid are left out, which breaks the spatial correlation of dense
pixels while the network still sees the whole image).
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["SegmentationCriterion", "loss_sampling_mask", "segmentation_loss"]


def _check_loss_inputs(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: torch.Tensor | None,
    keep_mask: torch.Tensor | None,
) -> None:
    """Raise ValueError naming the argument whose shape, dtype or device does not fit."""
    if logits.dim() != 4 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a float (N, K, H, W) tensor, got {logits.dtype} "
            f"of shape {tuple(logits.shape)}"
        )
    n, k, h, w = logits.shape
    if target.shape != (n, h, w):
        raise ValueError(
            f"target must have shape (N, H, W) = {(n, h, w)} to match logits "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    if target.dtype != torch.int64:
        raise ValueError(f"target must be int64, got {target.dtype}")
    if class_weights is not None and (
        class_weights.shape != (k,) or not class_weights.is_floating_point()
    ):
        raise ValueError(
            f"class_weights must be a float tensor of shape ({k},), got "
            f"{class_weights.dtype} of shape {tuple(class_weights.shape)}"
        )
    if keep_mask is not None and (keep_mask.shape != (n, h, w) or keep_mask.dtype != torch.bool):
        raise ValueError(
            f"keep_mask must be a bool tensor of shape {(n, h, w)}, got "
            f"{keep_mask.dtype} of shape {tuple(keep_mask.shape)}"
        )
    for name, tensor in (
        ("target", target),
        ("class_weights", class_weights),
        ("keep_mask", keep_mask),
    ):
        if tensor is not None and tensor.device != logits.device:
            raise ValueError(f"{name} is on {tensor.device} but logits are on {logits.device}")


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Per-pixel softmax cross-entropy, optionally class-weighted and loss-sampled.

    ``loss = sum_p w[y_p] * (-log softmax(logits_p)[y_p]) / #P`` where ``P`` is the
    set of pixels that are kept (``keep_mask``) and not labelled ``ignore_index``,
    and ``w`` is ``class_weights`` (all ones when ``None``).

    Normalisation: the weighted sum is divided by the *number* of counted
    pixels, not by the sum of their weights. This differs from PyTorch's
    ``F.cross_entropy(weight=..., reduction="mean")``, which divides by
    ``sum_p w[y_p]`` and so cancels the overall scale of the weights per batch.
    Dividing by the pixel count keeps the loss a per-pixel mean (the scale the
    recipe's learning rate near 1e-4 is tuned for) and lets the weights change
    how much a batch counts, not only the balance inside it. Without weights
    and sampling it equals the plain mean over non-ignored pixels, i.e. the
    reference's summed loss divided by the pixel count.

    If no pixel is counted (all ignored or all sampled out) the result is a
    zero that still depends on ``logits``, so ``backward()`` works and gives
    zero gradients. No value is read back to the host (no device sync).

    The cross-entropy is computed in float32 with autocast disabled, so
    half-precision logits from an autocast forward pass are upcast first.

    Args:
        logits: ``(N, K, H, W)`` float scores.
        target: ``(N, H, W)`` int64 class ids in ``[0, K)`` or ``ignore_index``.
        class_weights: optional ``(K,)`` float weights per class.
        keep_mask: optional ``(N, H, W)`` bool, ``True`` where the pixel enters
            the loss (see :func:`loss_sampling_mask`).
        ignore_index: label of pixels that never enter the loss.

    Returns:
        Scalar float32 tensor on the logits' device.

    Raises:
        ValueError: shapes, dtypes or devices that do not fit together.
    """
    _check_loss_inputs(logits, target, class_weights, keep_mask)
    # Log-softmax in half precision loses the small probabilities that the loss
    # is made of, so leave autocast and compute in float32.
    device_type = logits.device.type
    no_autocast = (
        torch.autocast(device_type=device_type, enabled=False)
        if torch.amp.is_autocast_available(device_type)
        else contextlib.nullcontext()
    )
    with no_autocast:
        weight = None if class_weights is None else class_weights.float()
        # Ignored pixels come back as 0; weighted pixels as w[y] * nll.
        per_pixel = F.cross_entropy(
            logits.float(), target, weight=weight, ignore_index=ignore_index, reduction="none"
        )
        counted = target != ignore_index
        if keep_mask is not None:
            counted = counted & keep_mask
        # where, not multiply: an inf at a dropped pixel would give inf * 0 = NaN.
        total = torch.where(counted, per_pixel, 0.0).sum()
        # clamp keeps the empty case at 0 / 1 = 0 without a data-dependent branch.
        return total / counted.sum().clamp(min=1)


def loss_sampling_mask(
    shape: tuple[int, int, int] | torch.Size,
    cell_size: int,
    p: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random keep-mask for loss sampling on the coarse score grid.

    The image is tiled into ``cell_size x cell_size`` cells from the top-left
    corner (one cell per pixel of the final coarse score map, e.g. 32 for
    FCN-32s); cells on the right and bottom borders may be partial (the grid has
    ``ceil(H / cell_size) x ceil(W / cell_size)`` cells). Each cell of each image
    is kept with probability ``p``, independently, and freshly drawn on every call;
    all pixels of a cell share its decision.

    Batch size: sampling keeps only a fraction ``p`` of the pixels in the loss,
    so the FCN paper raises the images per batch by ``1 / p`` to keep the number
    of pixels per update comparable when it compares against no sampling.

    ``p == 1`` returns all ``True`` without drawing random numbers: it is exactly
    "no sampling" and does not advance ``generator``.

    Args:
        shape: ``(N, H, W)`` of the target the mask applies to.
        cell_size: side of a cell in pixels, ``>= 1``.
        p: probability of keeping a cell, in ``(0, 1]``.
        generator: optional random generator (reproducible masks); it must live
            on ``device``.
        device: device of the mask; defaults to the generator's device, else CPU.

    Returns:
        ``(N, H, W)`` bool tensor, ``True`` where the pixel enters the loss.

    Raises:
        ValueError: ``p`` outside ``(0, 1]`` (NaN included), ``cell_size < 1``,
            or ``shape`` not three non-negative sizes.
    """
    # `not (0 < p <= 1)` is also true for NaN.
    if not (isinstance(p, numbers.Real) and 0.0 < p <= 1.0):
        raise ValueError(f"p must be in (0, 1], got p={p!r}")
    if not (isinstance(cell_size, numbers.Integral) and cell_size >= 1):
        raise ValueError(f"cell_size must be an integer >= 1, got {cell_size!r}")
    if len(shape) != 3 or any(int(size) < 0 for size in shape):
        raise ValueError(f"shape must be (N, H, W) with non-negative sizes, got {tuple(shape)}")
    n, h, w = (int(size) for size in shape)
    if device is None and generator is not None:
        device = generator.device

    if p == 1.0:
        return torch.ones((n, h, w), dtype=torch.bool, device=device)

    cell_size = int(cell_size)
    grid_h, grid_w = math.ceil(h / cell_size), math.ceil(w / cell_size)
    # P(U < p) = p for U uniform on [0, 1).
    keep_cells = torch.rand((n, grid_h, grid_w), generator=generator, device=device) < float(p)
    # Expand each cell to cell_size x cell_size pixels, then crop the partial border.
    return (
        keep_cells.repeat_interleave(cell_size, dim=1)
        .repeat_interleave(cell_size, dim=2)[:, :h, :w]
        .contiguous()
    )


class SegmentationCriterion:
    """The training loss, built once per training: ``criterion(logits, target)``.

    Holds what :func:`segmentation_loss` and :func:`loss_sampling_mask` need across
    steps: the ``(K,)`` class weights (or ``None``), the loss-sampling probability
    ``p`` with its cell size, and the generator that draws the masks (reseed it
    with :meth:`reseed` to make a resumed run draw what an uninterrupted one would).
    With ``p == 1`` no mask is drawn and the generator is never advanced.
    """

    def __init__(
        self,
        *,
        class_weights: torch.Tensor | None = None,
        loss_sampling: float = 1.0,
        cell_size: int = 32,
        ignore_index: int = 255,
    ):
        if not (isinstance(loss_sampling, numbers.Real) and 0.0 < loss_sampling <= 1.0):
            raise ValueError(f"loss_sampling must be in (0, 1], got {loss_sampling!r}")
        self.class_weights = class_weights
        self.loss_sampling = float(loss_sampling)
        self.cell_size = int(cell_size)
        self.ignore_index = ignore_index
        self.generator = torch.Generator()

    def reseed(self, seed: int) -> None:
        """Restart the loss-sampling masks' random stream from ``seed``."""
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The scalar loss of ``(N, K, H, W)`` logits against ``(N, H, W)`` int64 targets."""
        keep = None
        if self.loss_sampling < 1.0:
            keep = loss_sampling_mask(
                target.shape, self.cell_size, self.loss_sampling, generator=self.generator
            ).to(target.device, non_blocking=True)
        weights = self.class_weights
        if weights is not None and weights.device != logits.device:
            weights = self.class_weights = weights.to(logits.device)
        return segmentation_loss(
            logits, target, class_weights=weights, keep_mask=keep, ignore_index=self.ignore_index
        )
