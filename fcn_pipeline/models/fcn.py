"""FCN-32s, FCN-16s and FCN-8s (Long, Shelhamer, Darrell, CVPR 2015, section 4.2 and figure 3).

All three score the convolutionalized VGG16's fc7 with a 1x1 convolution (``score_fr``)
and upsample the scores back to the input. FCN-16s first upsamples 2x (``upscore2``) and
adds scores of pool4 (``score_pool4``) before a 16x upsampling; FCN-8s adds pool3
(``score_pool3``) after a second 2x step (``upscore_pool4``) and upsamples 8x.

Crops. conv1_1's 100-pixel padding makes every map larger than needed, so each map is
cropped to line up with the next and, at the end, with the input. The offsets follow
from the layers' geometry (see :mod:`fcn_pipeline.models.geometry`) and equal the
reference's: FCN-32s 19; FCN-16s 5 (score_pool4) and 27; FCN-8s 5, 9 (score_pool3) and 31.

``upsample="interp"`` replaces each transposed convolution (kernel 2f, stride f) by a
bilinear resize by f with half-pixel centres. Both put their output pixels on the same
points of the input (deconvolution pixel j lies where resize pixel j - f/2 does), but of an
n-pixel map the deconvolution makes f n + f pixels and the resize f n: the resize leaves
out f/2 pixels at each end. So the same crops apply, each shifted by the f/2 pixels per
step that are missing (FCN-32s 3; FCN-16s 6 and 3; FCN-8s 6, 12 and 3). Inside, both
interpolate between the same two coarse pixels and agree; within f pixels of a map's edge
the deconvolution fades towards zero where the resize repeats the edge value.

``geometry="same"`` (a departure from the paper, see :mod:`fcn_pipeline.models.geometry`)
drops the 100-pixel padding: every stride-s map has ceil(H / s) pixels, the transposed
convolutions are padded to make f h pixels, and it is the upsampled coarse map, which may
be a pixel longer than its skip, that is cropped (by 0 pixels: the grids coincide). Each
model's ``crop_offsets`` names the maps it crops. ``norm="batch"`` adds BatchNorm to the
backbone (:class:`~fcn_pipeline.models.vgg16.VGG16Backbone`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fcn_pipeline.models.geometry import GEOMETRIES, Grid
from fcn_pipeline.models.upsample import UPSAMPLE_MODES, upsampler
from fcn_pipeline.models.vgg16 import NORMS, VGG16Backbone, read_torchvision_vgg16

VARIANTS = ("fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce")
BACKBONES = ("vgg16",)
INPUT_GRID = Grid()  # the input image: pixel i at coordinate i

# The at-once FCN-8s (reference "voc-fcn8s-atonce") learns all skips together from VGG16
# and scales their inputs down by fixed factors, so that pool3/pool4's larger activations
# do not dominate fc7's scores.
AT_ONCE_SCALE_POOL4 = 0.01
AT_ONCE_SCALE_POOL3 = 0.0001


def score_layer(in_channels: int, num_classes: int) -> nn.Conv2d:
    """A 1x1 convolution to class scores, zero-initialised as in the paper (section 4.3)."""
    layer = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def crop(x: Tensor, offset: int, like: Tensor) -> Tensor:
    """The window of ``x`` (N, C, h, w) starting at (offset, offset) with ``like``'s
    spatial size (a view, no copy)."""
    height, width = like.shape[-2:]
    return x[:, :, offset : offset + height, offset : offset + width]


def fusion_crop(upsampled_name: str, upsampled: Grid, skip_name: str, skip: Grid) -> dict[str, int]:
    """How a skip fusion lines up its two maps: ``{name: offset}`` of the one to crop.

    The map that starts earlier on the input is cropped to the other one's grid and size:
    the skip in the ``paper`` geometry (conv1_1's padding makes pool3/pool4 reach far
    beyond the image), the upsampled map in ``same`` (both start on the same point, and the
    upsampled coarse map, 2 ceil(H / 2s) pixels, may end a pixel after the skip's ceil(H / s)).
    Raises ValueError if the two grids cannot be aligned by a crop.
    """
    if upsampled.origin <= skip.origin:
        return {upsampled_name: upsampled.offset_onto(skip)}
    return {skip_name: skip.offset_onto(upsampled)}


def fuse(
    upsampled: Tensor, skip: Tensor, offsets: Mapping[str, int], upsampled_name: str, skip_name: str
) -> Tensor:
    """``upsampled + skip`` after cropping whichever of the two ``offsets`` names (see
    :func:`fusion_crop`); the sum has the size of the map that was not cropped."""
    if skip_name in offsets:
        return upsampled + crop(skip, offsets[skip_name], upsampled)
    return crop(upsampled, offsets[upsampled_name], skip) + skip


def _set_options(model: nn.Module, num_classes: int, backbone: VGG16Backbone, upsample: str):
    """The attributes a model record needs to rebuild ``model``."""
    model.num_classes, model.width, model.upsample = num_classes, backbone.width, upsample
    model.geometry, model.norm = backbone.geometry, backbone.norm


class FCN32s(nn.Module):
    """FCN-32s: fc7 scores upsampled 32x in one step (build it with :func:`build_fcn`).

    Maps a float (N, 3, H, W) image batch to (N, num_classes, H, W) class scores.
    """

    variant = "fcn32s"
    output_stride = 32

    def __init__(self, num_classes: int, backbone: VGG16Backbone, upsample: str = "frozen"):
        super().__init__()
        _set_options(self, num_classes, backbone, upsample)
        padded = self.geometry == "same"
        self.backbone = backbone
        self.score_fr = score_layer(self.backbone.out_channels["fc7"], num_classes)
        self.upscore = upsampler(num_classes, 32, upsample, padded=padded)

        upscore = self.backbone.grids["fc7"].after(self.upscore)
        # upscore pixel 19 lies on input pixel 0 (3 with interp, which has no faded border;
        # 0 in the "same" geometry)
        self.crop_offsets = {"upscore": upscore.offset_onto(INPUT_GRID)}

    def forward(self, x: Tensor) -> Tensor:
        _, _, fc7 = self.backbone(x)
        upscore = self.upscore(self.score_fr(fc7))
        return crop(upscore, self.crop_offsets["upscore"], x)


class FCN16s(nn.Module):
    """FCN-16s: fc7 scores upsampled 2x, plus pool4 scores, upsampled 16x (see :func:`build_fcn`).

    Maps a float (N, 3, H, W) image batch to (N, num_classes, H, W) class scores.
    """

    variant = "fcn16s"
    output_stride = 16

    def __init__(self, num_classes: int, backbone: VGG16Backbone, upsample: str = "frozen"):
        super().__init__()
        _set_options(self, num_classes, backbone, upsample)
        padded = self.geometry == "same"
        self.backbone = backbone
        self.score_fr = score_layer(self.backbone.out_channels["fc7"], num_classes)
        self.upscore2 = upsampler(num_classes, 2, upsample, padded=padded)
        self.score_pool4 = score_layer(self.backbone.out_channels["pool4"], num_classes)
        self.upscore16 = upsampler(num_classes, 16, upsample, padded=padded)

        grids = self.backbone.grids
        upscore2 = grids["fc7"].after(self.upscore2)
        # paper: pool4 (stride 16) starts 5 pixels before upscore2 (6 with interp), so
        # score_pool4 is cropped; same: upscore2 is cropped (by 0) to score_pool4
        self.crop_offsets = fusion_crop("upscore2", upscore2, "score_pool4", grids["pool4"])
        fused = upscore2 if "score_pool4" in self.crop_offsets else grids["pool4"]
        # upscore16 pixel 27 lies on input pixel 0 (3 with interp, 0 with "same")
        self.crop_offsets["upscore16"] = fused.after(self.upscore16).offset_onto(INPUT_GRID)

    def forward(self, x: Tensor) -> Tensor:
        _, pool4, fc7 = self.backbone(x)
        upscore2 = self.upscore2(self.score_fr(fc7))
        fuse_pool4 = fuse(
            upscore2, self.score_pool4(pool4), self.crop_offsets, "upscore2", "score_pool4"
        )
        upscore16 = self.upscore16(fuse_pool4)
        return crop(upscore16, self.crop_offsets["upscore16"], x)


class FCN8s(nn.Module):
    """FCN-8s: FCN-16s's fused scores upsampled 2x, plus pool3 scores, upsampled 8x (see
    :func:`build_fcn`).

    ``at_once=True`` is the variant trained in one stage from VGG16: pool4 is scaled by
    0.01 and pool3 by 0.0001 before scoring. Maps a float (N, 3, H, W) image batch to
    (N, num_classes, H, W) class scores.
    """

    output_stride = 8

    def __init__(
        self,
        num_classes: int,
        backbone: VGG16Backbone,
        upsample: str = "frozen",
        *,
        at_once: bool = False,
    ):
        super().__init__()
        _set_options(self, num_classes, backbone, upsample)
        padded = self.geometry == "same"
        self.variant = "fcn8s_atonce" if at_once else "fcn8s"
        self.scale_pool4 = AT_ONCE_SCALE_POOL4 if at_once else 1.0
        self.scale_pool3 = AT_ONCE_SCALE_POOL3 if at_once else 1.0
        self.backbone = backbone
        self.score_fr = score_layer(self.backbone.out_channels["fc7"], num_classes)
        self.upscore2 = upsampler(num_classes, 2, upsample, padded=padded)
        self.score_pool4 = score_layer(self.backbone.out_channels["pool4"], num_classes)
        self.upscore_pool4 = upsampler(num_classes, 2, upsample, padded=padded)
        self.score_pool3 = score_layer(self.backbone.out_channels["pool3"], num_classes)
        self.upscore8 = upsampler(num_classes, 8, upsample, padded=padded)

        grids = self.backbone.grids
        upscore2 = grids["fc7"].after(self.upscore2)
        # paper: pool4 (stride 16) starts 5 pixels before upscore2 (6 with interp), so
        # score_pool4 is cropped; same: upscore2 is cropped (by 0) to score_pool4
        self.crop_offsets = fusion_crop("upscore2", upscore2, "score_pool4", grids["pool4"])
        fuse_pool4 = upscore2 if "score_pool4" in self.crop_offsets else grids["pool4"]
        upscore_pool4 = fuse_pool4.after(self.upscore_pool4)
        # paper: pool3 (stride 8) starts 9 pixels before upscore_pool4 (12 with interp)
        self.crop_offsets |= fusion_crop(
            "upscore_pool4", upscore_pool4, "score_pool3", grids["pool3"]
        )
        fuse_pool3 = upscore_pool4 if "score_pool3" in self.crop_offsets else grids["pool3"]
        # upscore8 pixel 31 lies on input pixel 0 (3 with interp, 0 with "same")
        self.crop_offsets["upscore8"] = fuse_pool3.after(self.upscore8).offset_onto(INPUT_GRID)

    def forward(self, x: Tensor) -> Tensor:
        pool3, pool4, fc7 = self.backbone(x)
        if self.scale_pool4 != 1.0:
            pool4 = pool4 * self.scale_pool4
        if self.scale_pool3 != 1.0:
            pool3 = pool3 * self.scale_pool3
        offsets = self.crop_offsets
        upscore2 = self.upscore2(self.score_fr(fc7))
        fuse_pool4 = fuse(upscore2, self.score_pool4(pool4), offsets, "upscore2", "score_pool4")
        upscore_pool4 = self.upscore_pool4(fuse_pool4)
        score_pool3 = self.score_pool3(pool3)
        fuse_pool3 = fuse(upscore_pool4, score_pool3, offsets, "upscore_pool4", "score_pool3")
        upscore8 = self.upscore8(fuse_pool3)
        return crop(upscore8, offsets["upscore8"], x)


def _check_choice(what: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def output_stride(variant: str) -> int:
    """The stride of the coarsest score map ``variant`` predicts from: 32, 16 or 8."""
    _check_choice("FCN variant", variant, VARIANTS)
    return {"fcn32s": FCN32s, "fcn16s": FCN16s}.get(variant, FCN8s).output_stride


def build_fcn(
    variant: str,
    num_classes: int,
    *,
    backbone: str = "vgg16",
    width: float = 1.0,
    upsample: str = "frozen",
    pretrained: str | os.PathLike[str] | None = None,
    geometry: str = "paper",
    norm: str = "none",
) -> nn.Module:
    """Build an FCN: ``variant`` in ``fcn32s``, ``fcn16s``, ``fcn8s``, ``fcn8s_atonce``.

    The model maps a float (N, 3, H, W) image batch, any H, W >= 1, to float
    (N, num_classes, H, W) class scores, and has attributes ``output_stride`` (32, 16, 8)
    and ``crop_offsets``. ``width`` scales every channel count of the backbone (1.0 is the
    paper's VGG16; 0.125 trains on a CPU). ``upsample`` is ``frozen`` (bilinear transposed
    convolutions, not trained: the reference), ``learned`` (bilinear-initialised and
    trained) or ``interp`` (bilinear resize, no parameters). ``pretrained`` is the path
    of a torchvision VGG16 state dict to start the backbone from (width 1.0 only);
    without it the backbone is He-initialised. Score layers always start at zero.

    ``geometry`` (:data:`GEOMETRIES`) is ``paper`` (conv1_1 padded by 100, the reference's
    crops) or ``same`` (no extra padding: every map covers the input with ceil(H / s)
    pixels; a departure from the paper, much cheaper on small images). ``norm``
    (:data:`NORMS`) is ``none`` (the paper) or ``batch`` (BatchNorm after every backbone
    convolution; not with ``pretrained``, whose VGG16 has none). The model also has the
    attributes ``num_classes``, ``width``, ``upsample``, ``geometry`` and ``norm``.

    Raises ValueError for an unknown variant, backbone, upsample mode, geometry or norm,
    num_classes < 1, width <= 0, pretrained with norm="batch", or a pretrained file that
    does not fit.
    """
    _check_choice("FCN variant", variant, VARIANTS)
    _check_choice("backbone", backbone, BACKBONES)
    _check_choice("upsample mode", upsample, UPSAMPLE_MODES)
    _check_choice("geometry", geometry, GEOMETRIES)
    _check_choice("norm", norm, NORMS)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if (
        isinstance(width, bool)
        or not isinstance(width, int | float)
        or not math.isfinite(width)
        or width <= 0
    ):
        raise ValueError(f"width must be a finite number > 0, got {width!r}")
    if pretrained is not None and width != 1.0:
        raise ValueError(
            f"pretrained VGG16 weights {os.fspath(pretrained)!r} need width=1.0, got width={width}"
        )
    if pretrained is not None and norm != "none":
        # VGG16's features were learned without normalisation: a BatchNorm that starts as
        # an identity in eval mode still rescales them by batch statistics in training
        raise ValueError(
            f"pretrained VGG16 weights {os.fspath(pretrained)!r} have no BatchNorm layers: "
            f"use norm='none' with pretrained, or no pretrained with norm={norm!r}"
        )

    if pretrained is None:
        backbone = VGG16Backbone(width, geometry, norm)
    else:
        vgg16 = read_torchvision_vgg16(pretrained)  # checked before any time goes into a model
        with torch.device("meta"):  # no random initialisation only to be overwritten
            backbone = VGG16Backbone(width, geometry, norm)
        backbone.to_empty(device="cpu")
        backbone.load_state_dict(vgg16)

    if variant == "fcn32s":
        return FCN32s(num_classes, backbone, upsample)
    if variant == "fcn16s":
        return FCN16s(num_classes, backbone, upsample)
    return FCN8s(num_classes, backbone, upsample, at_once=variant == "fcn8s_atonce")


def init_from_coarser(model: nn.Module, coarser_state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Start ``model`` from a trained coarser net, as the paper trains FCN-16s from FCN-32s
    and FCN-8s from FCN-16s (section 4.2).

    Copies every parameter and buffer of ``coarser_state_dict`` whose name and shape match
    one of ``model``'s (the backbone, BatchNorm running statistics included, score_fr, and
    whatever skip and upsampling layers the two share); the rest of ``model`` keeps its
    initialisation, so new skip layers stay at zero and the finer net starts out predicting
    what the coarser one did. Keys of the coarser net that ``model`` lacks outside the
    backbone (e.g. FCN-32s's ``upscore``) are ignored. The geometry leaves no trace in a
    state dict: the caller must build ``model`` with the coarser net's.

    Raises ValueError naming the key if either state dict has a backbone entry the other
    lacks (another backbone or norm), if the coarser one lacks score_fr, or if a shared
    entry has another shape (another num_classes or width). Returns ``model``.
    """
    ours = model.state_dict()
    for key in coarser_state_dict:
        if key.startswith("backbone.") and key not in ours:
            raise ValueError(
                f"coarser state dict has {key!r}, which this model lacks: another norm?"
            )
    for key, tensor in ours.items():
        if key not in coarser_state_dict:
            if key.startswith(("backbone.", "score_fr.")):
                raise ValueError(
                    f"coarser state dict has no {key!r}: not an FCN of this backbone and norm"
                )
            continue
        theirs = coarser_state_dict[key]
        if theirs.shape != tensor.shape:
            raise ValueError(
                f"coarser state dict's {key!r} has shape {tuple(theirs.shape)}, this model's "
                f"{tuple(tensor.shape)}: another num_classes or width?"
            )
    with torch.no_grad():
        for key, tensor in ours.items():
            if key in coarser_state_dict:
                tensor.copy_(coarser_state_dict[key])
    return model


def parameter_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups as the reference trains FCN: weights at ``lr`` with
    ``weight_decay``, biases at 2 ``lr`` without decay; with ``norm="batch"``, the
    BatchNorm scales and shifts at ``lr`` without decay.

    (A BatchNorm scale and shift set the size and offset of normalised activations rather
    than weighting inputs; leaving them undecayed is the common practice. The reference has
    no BatchNorm, so its 2x rate for biases is not carried over to the shifts.) Only
    parameters with ``requires_grad`` are included (frozen upsampling kernels are not); an
    empty group is left out. Each group also carries a ``name`` (``"weights"``,
    ``"biases"`` or ``"norm"``). Pass the result to e.g. ``torch.optim.SGD``.
    """
    norm_parameters = {
        id(parameter)
        for module in model.modules()
        if isinstance(module, nn.BatchNorm2d)
        for parameter in module.parameters(recurse=False)
    }
    weights, biases, norms = [], [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in norm_parameters:
            norms.append(parameter)
        else:
            (biases if name.endswith("bias") else weights).append(parameter)
    groups = [
        {"name": "weights", "params": weights, "lr": lr, "weight_decay": weight_decay},
        {"name": "biases", "params": biases, "lr": 2 * lr, "weight_decay": 0.0},
        {"name": "norm", "params": norms, "lr": lr, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
