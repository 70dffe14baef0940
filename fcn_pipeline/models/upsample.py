"""Upsampling layers of FCN: bilinear-initialised transposed convolutions, or plain resizing.

Every upsampling step of FCN-32s/16s/8s is a transposed convolution ("deconvolution",
paper section 3.3) whose kernel starts out as bilinear interpolation, one kernel per class
on the channel diagonal. The CVPR paper learns the 2x layers and fixes the last one; the
public reference fixes all of them. Three modes are offered:

- ``learned``: bilinear initialisation, then every upsampling layer is trained;
- ``frozen``: the same kernels with ``requires_grad=False`` (the reference);
- ``interp``: no transposed convolution at all, a bilinear resize (how later papers
  describe FCN).

Under bfloat16 autocast on a CPU with AMX tiles, the transposed convolutions run in
float32: there oneDNN's AMX bf16 kernel (PyTorch 2.14.1) computes the gradient with
respect to the input of a transposed convolution with a 16-pixel kernel or larger wrong
(stride 8 padded, 16, 32: relative error about 1 against float32, where the AVX512-BF16
kernels are within 0.3 %), and the nets diverge (FCN-32s's loss rose from 2.8 to 107 in
four epochs). Elsewhere (AVX512-BF16 without AMX, CUDA) they run in the
autocast dtype.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

UPSAMPLE_MODES = ("learned", "frozen", "interp")


@cache
def amx_cpu() -> bool:
    """Whether this CPU has AMX tiles (oneDNN runs its bf16 kernels on them)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


class BilinearDeconv(nn.ConvTranspose2d):
    """A transposed convolution that leaves CPU bfloat16 autocast on an AMX CPU and runs
    in float32 there (see the module's note); otherwise an ``nn.ConvTranspose2d``."""

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if x.is_cpu and torch.is_autocast_enabled("cpu") and amx_cpu():
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float(), output_size)
        return super().forward(x, output_size)


def bilinear_kernel(factor: int) -> Tensor:
    """The 2-D bilinear interpolation kernel for an integer upsampling ``factor`` f >= 1.

    Returns a float32 tensor of shape (k, k), k = 2f - f mod 2, on the current default device.
    """
    if factor < 1:
        raise ValueError(f"upsampling factor must be >= 1, got {factor}")
    size = 2 * factor - factor % 2
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    # w(i, j) = (1 - |i - c| / f) * (1 - |j - c| / f): a separable tent of half-width f.
    taps = 1 - (torch.arange(size, dtype=torch.float32) - centre).abs() / factor
    return taps[:, None] * taps[None, :]


def bilinear_upsample_weight(channels: int, factor: int) -> Tensor:
    """Transposed-convolution weight that upsamples each channel on its own.

    Returns a float32 tensor of shape (channels, channels, k, k) holding
    :func:`bilinear_kernel` on the channel diagonal and zeros elsewhere (no class mixing).
    """
    kernel = bilinear_kernel(factor)
    weight = torch.zeros(channels, channels, *kernel.shape, dtype=kernel.dtype)
    diagonal = torch.arange(channels)
    weight[diagonal, diagonal] = kernel
    return weight


def bilinear_deconv(
    channels: int, factor: int, *, trainable: bool, padding: int = 0
) -> BilinearDeconv:
    """A ``channels -> channels`` transposed convolution of stride ``factor``, kernel 2f - f mod 2,
    no bias, initialised to bilinear interpolation; ``trainable=False`` freezes its weight.

    With ``padding=0`` (FCN's choice, the net crops afterwards) a (N, C, h, w) map becomes
    (N, C, f(h - 1) + k, f(w - 1) + k); with ``padding=ceil((f - 1) / 2)`` it becomes
    (N, C, f h, f w).
    """
    size = 2 * factor - factor % 2
    deconv = BilinearDeconv(channels, channels, size, stride=factor, padding=padding, bias=False)
    with torch.no_grad():
        deconv.weight.copy_(bilinear_upsample_weight(channels, factor))
    deconv.weight.requires_grad_(trainable)
    return deconv


class BilinearResize(nn.Module):
    """Bilinear resize by an integer ``factor`` with half-pixel centres (align_corners=False).

    Maps (N, C, h, w) to (N, C, f h, f w), same dtype; has no parameters.
    """

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def upsampler(channels: int, factor: int, mode: str, *, padded: bool = False) -> nn.Module:
    """The upsampling layer of an FCN for ``mode`` in :data:`UPSAMPLE_MODES`.

    ``padded=True`` (the ``same`` geometry) pads a transposed convolution by
    ceil((f - 1) / 2), so that like the resize it makes f h pixels of an h-pixel map, on the
    same points; the unpadded one (the paper's) makes f h + f and leaves the crop to the net.
    """
    if mode == "interp":
        return BilinearResize(factor)
    if mode in ("learned", "frozen"):
        padding = math.ceil((factor - 1) / 2) if padded else 0
        return bilinear_deconv(channels, factor, trainable=mode == "learned", padding=padding)
    raise ValueError(f"unknown upsample mode {mode!r}; allowed: {', '.join(UPSAMPLE_MODES)}")
