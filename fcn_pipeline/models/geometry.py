"""Coordinate maps: where each feature map of an FCN lies on the input image.

FCN pads conv1_1 by 100 pixels so that every input size gives a large enough map, and
then crops each map so that it lines up with the next one and, at the end, with the
input. The crop offsets follow from the layers' kernel sizes, strides and paddings;
this module derives them instead of hard-coding them.

Two network geometries are offered (:data:`GEOMETRIES`):

- ``paper``: the reference's. conv1_1 pads by 100, fc6 is a valid 7x7 convolution and the
  upsampling layers are unpadded; the skips are cropped onto the upsampled maps (FCN-32s
  19; FCN-16s 5, 27; FCN-8s 5, 9, 31).
- ``same``: a departure from the paper. conv1_1 pads by 1 like every 3x3 convolution and
  fc6 by 3, so a stride-s map has ceil(H / s) pixels, pixel i centred on the middle of
  input block i; the transposed convolutions are padded by f/2 so that they make exactly
  f h pixels. An upsampled coarse map then lies on its skip's grid but may be a pixel
  longer (2 ceil(H / 32) >= ceil(H / 16)), so it is the upsampled map that is cropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from torch import nn

from fcn_pipeline.models.upsample import BilinearResize

GEOMETRIES = ("paper", "same")


@dataclass(frozen=True)
class Grid:
    """Where the pixels of a feature map lie on the input image.

    Pixel i of the map (along either axis) is centred on input coordinate ``step * i + origin``,
    both exact fractions. Following a map through the net's layers gives the crop offsets
    that align maps with each other and with the input (Caffe's ``coord_map`` does the same).
    """

    step: Fraction = Fraction(1)
    origin: Fraction = Fraction(0)

    def after(self, layer: nn.Module) -> Grid:
        """The grid of ``layer``'s output when its input lies on this grid."""
        if isinstance(layer, nn.Conv2d | nn.MaxPool2d):
            k, s, p = _kernel_stride_padding(layer)
            # output pixel j is centred on input pixel s j - p + (k - 1) / 2
            return Grid(self.step * s, self.origin + self.step * (Fraction(k - 1, 2) - p))
        if isinstance(layer, nn.ConvTranspose2d):
            k, s, p = _kernel_stride_padding(layer)
            # input pixel i spreads onto output pixels s i - p + [0, k), centred on the middle one
            return Grid(self.step / s, self.origin + self.step * (p - Fraction(k - 1, 2)) / s)
        if isinstance(layer, BilinearResize):
            # half-pixel centres: output pixel j samples input coordinate (j + 1/2) / f - 1/2
            f = layer.factor
            return Grid(
                self.step / f, self.origin + self.step * (Fraction(1, 2 * f) - Fraction(1, 2))
            )
        raise TypeError(f"no coordinate map for {type(layer).__name__}")

    def cropped(self, offset: int) -> Grid:
        """The grid of a map on this grid cropped from pixel ``offset`` onwards."""
        return Grid(self.step, self.origin + self.step * offset)

    def offset_onto(self, target: Grid) -> int:
        """The index, in a map on this grid, of the pixel that lies on ``target``'s pixel 0.

        Cropping this map from that index aligns it with a map on ``target``; raises
        ValueError if the grids differ in step or are not a whole, non-negative number of
        pixels apart.
        """
        offset = (target.origin - self.origin) / self.step
        if self.step != target.step or offset.denominator != 1 or offset < 0:
            raise ValueError(f"{self} cannot be cropped onto {target}")
        return int(offset)


def _kernel_stride_padding(layer: nn.Module) -> tuple[int, int, int]:
    if getattr(layer, "dilation", 1) not in (1, (1, 1)):
        raise ValueError(f"{type(layer).__name__} with dilation has no simple coordinate map")
    return _square(layer, "kernel_size"), _square(layer, "stride"), _square(layer, "padding")


def _square(layer: nn.Module, name: str) -> int:
    value = getattr(layer, name)
    if isinstance(value, tuple):
        if len(set(value)) != 1:
            raise ValueError(f"{type(layer).__name__}.{name}={value} is not square")
        value = value[0]
    if not isinstance(value, int):
        raise ValueError(f"{type(layer).__name__}.{name}={value!r} is not an integer")
    return value
