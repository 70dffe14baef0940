"""The convolutionalized VGG16 of FCN (paper section 3.1 and 4.1).

VGG16's thirteen 3x3 convolutions and five 2x2 max-pools, changed to take any input size:
conv1_1 pads by 100 pixels, so that even a 1x1 input leaves a 1x1 map after fc6; the pools
round up (ceil mode), so that every map covers the whole input and can be cropped to line
up with it; and the fully connected fc6/fc7 become a 7x7 and a 1x1 convolution
("convolutionalization"), each followed by ReLU and dropout.

Two options depart from the paper (the defaults reproduce it): ``geometry="same"`` pads
conv1_1 by 1 and fc6 by 3 instead (see :mod:`fcn_pipeline.models.geometry`), and
``norm="batch"`` puts a BatchNorm2d between every convolution and its ReLU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcn_pipeline.errors import load_error_reason
from fcn_pipeline.models.geometry import GEOMETRIES, Grid

# VGG16 configuration "D": output channels of each 3x3 conv, "pool" for a 2x2 max-pool.
VGG16_LAYERS: tuple[tuple[str, int | str], ...] = (
    ("conv1_1", 64), ("conv1_2", 64), ("pool1", "pool"),
    ("conv2_1", 128), ("conv2_2", 128), ("pool2", "pool"),
    ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256), ("pool3", "pool"),
    ("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512), ("pool4", "pool"),
    ("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512), ("pool5", "pool"),
)  # fmt: skip
FC_CHANNELS = 4096  # fc6 and fc7 of VGG16
FC6_KERNEL = 7  # pool5 of a 224x224 image is 7x7: fc6 looked at all of it
CONV1_1_PADDING = 100  # lets any input size survive the five pools and fc6
NORMS = ("none", "batch")  # no normalisation (the paper) or BatchNorm2d after every conv


def scaled_channels(channels: int, width: float) -> int:
    """``channels`` times the width multiplier, rounded, at least 1."""
    return max(1, round(channels * width))


class VGG16Backbone(nn.Module):
    """conv1_1 ... pool5, fc6, fc7 of FCN's VGG16, every channel count scaled by ``width``.

    ``forward`` maps a float (N, 3, H, W) image batch to ``(pool3, pool4, fc7)``, of shapes
    (N, 256w, h3, w3), (N, 512w, h4, w4) and (N, 4096w, h7, w7), each on the grid
    :attr:`grids` gives (stride 8, 16 and 32 on the input). ``geometry`` is one of
    :data:`GEOMETRIES` (``paper``: conv1_1 padded by 100, valid fc6; ``same``: conv1_1
    padded by 1, fc6 by 3, so h_s = ceil(H / s)); ``norm`` one of :data:`NORMS`
    (``batch``: a BatchNorm2d ``bn1_1`` ... ``bn5_3``, ``bn6``, ``bn7`` after each conv,
    before its ReLU, and the convs lose their bias, which the norm's shift replaces).
    """

    def __init__(self, width: float = 1.0, geometry: str = "paper", norm: str = "none"):
        super().__init__()
        for what, value, allowed in (("geometry", geometry, GEOMETRIES), ("norm", norm, NORMS)):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
        self.width, self.geometry, self.norm = width, geometry, norm
        # a conv bias before BatchNorm is cancelled by its mean subtraction (zero gradient)
        bias = norm == "none"
        in_channels = 3
        for name, spec in VGG16_LAYERS:
            if spec == "pool":
                self.add_module(name, nn.MaxPool2d(2, stride=2, ceil_mode=True))
                continue
            out_channels = scaled_channels(int(spec), width)
            padding = CONV1_1_PADDING if name == "conv1_1" and geometry == "paper" else 1
            conv = nn.Conv2d(in_channels, out_channels, 3, padding=padding, bias=bias)
            self.add_module(name, conv)
            self._add_norm(name, out_channels)
            in_channels = out_channels
        fc_channels = scaled_channels(FC_CHANNELS, width)
        fc6_padding = 0 if geometry == "paper" else FC6_KERNEL // 2  # "same": keeps the size
        self.fc6 = nn.Conv2d(in_channels, fc_channels, FC6_KERNEL, padding=fc6_padding, bias=bias)
        self._add_norm("fc6", fc_channels)
        self.drop6 = nn.Dropout(0.5)
        self.fc7 = nn.Conv2d(fc_channels, fc_channels, 1, bias=bias)
        self._add_norm("fc7", fc_channels)
        self.drop7 = nn.Dropout(0.5)
        self.out_channels = {
            "pool3": self.conv3_3.out_channels,
            "pool4": self.conv4_3.out_channels,
            "fc7": fc_channels,
        }
        self.grids = self._grids()
        self.reset_parameters()

    def _add_norm(self, conv_name: str, channels: int) -> None:
        if self.norm == "batch":
            self.add_module(norm_name(conv_name), nn.BatchNorm2d(channels))

    def reset_parameters(self) -> None:
        """He initialisation (fan-in, for ReLU) of every weight, zero biases; BatchNorm
        layers (if any) start as identities (scale 1, shift 0, running stats 0 and 1).

        Only used when no pretrained VGG16 is loaded, e.g. to train a narrow net on a CPU.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()

    def _grids(self) -> dict[str, Grid]:
        grid, grids = Grid(), {}
        for name, _ in VGG16_LAYERS:
            grid = grid.after(getattr(self, name))
            grids[name] = grid
        grids["fc7"] = grid.after(self.fc6).after(self.fc7)
        return {name: grids[name] for name in ("pool3", "pool4", "fc7")}

    def _conv_relu(self, name: str, x: Tensor) -> Tensor:
        x = getattr(self, name)(x)
        if self.norm == "batch":
            x = getattr(self, norm_name(name))(x)
        return F.relu(x, inplace=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        skips = {}
        for name, spec in VGG16_LAYERS:
            x = getattr(self, name)(x) if spec == "pool" else self._conv_relu(name, x)
            if name in ("pool3", "pool4"):
                skips[name] = x
        x = self.drop6(self._conv_relu("fc6", x))
        x = self.drop7(self._conv_relu("fc7", x))
        return skips["pool3"], skips["pool4"], x


def norm_name(conv_name: str) -> str:
    """The name of the BatchNorm layer after convolution ``conv_name``: ``conv3_2`` ->
    ``bn3_2``, ``fc6`` -> ``bn6``."""
    return "bn" + conv_name.removeprefix("conv").removeprefix("fc")


def torchvision_vgg16_keys() -> dict[str, str]:
    """Map torchvision's VGG16 state-dict prefixes to ours: ``features.0`` -> ``conv1_1``, ...,
    ``classifier.0`` -> ``fc6``, ``classifier.3`` -> ``fc7`` (``classifier.6``, fc8, has no
    counterpart in FCN)."""
    names, index = {}, 0
    for name, spec in VGG16_LAYERS:
        if spec == "pool":
            index += 1  # MaxPool2d
        else:
            names[f"features.{index}"] = name
            index += 2  # Conv2d, ReLU
    names["classifier.0"] = "fc6"  # Linear, ReLU, Dropout
    names["classifier.3"] = "fc7"  # Linear, ReLU, Dropout
    return names


IGNORED_TORCHVISION_KEYS = frozenset({"classifier.6.weight", "classifier.6.bias"})


def read_torchvision_vgg16(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a torchvision-format VGG16 state dict and convert it to :class:`VGG16Backbone`'s
    (full width): a dict of float tensors keyed ``conv1_1.weight`` ... ``fc7.bias``.

    fc6/fc7 are convolutionalized exactly: ``classifier.0.weight`` (4096, 25088) becomes
    (4096, 512, 7, 7) (torchvision flattens pool5 channel-major, the order of a conv
    weight) and ``classifier.3.weight`` (4096, 4096) becomes (4096, 4096, 1, 1); biases are
    kept as they are and fc8 (``classifier.6``) is ignored. torchvision's weights expect
    RGB images scaled to [0, 1] and normalised with the ImageNet mean and std.

    Raises ValueError naming the file (and the key) if it is not a torchvision VGG16 state
    dict: unreadable, not a dict, a missing or unexpected key, or a tensor of the wrong
    shape. Nothing is ever downloaded.
    """
    name = os.fspath(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # corrupt file, pickle refused by weights_only=True, ...
        raise ValueError(
            f"{name!r} is not a torchvision VGG16 state dict ({load_error_reason(exc)})"
        ) from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{name!r} holds a {type(state).__name__}, not a VGG16 state dict")

    with torch.device("meta"):  # shapes only
        ours = VGG16Backbone(1.0).state_dict()
    expected: dict[str, tuple[str, torch.Size]] = {}  # torchvision key -> (our key, its shape)
    for theirs_prefix, our_prefix in torchvision_vgg16_keys().items():
        for kind in ("weight", "bias"):
            shape = ours[f"{our_prefix}.{kind}"].shape
            if our_prefix in ("fc6", "fc7") and kind == "weight":
                shape = torch.Size([shape[0], shape[1:].numel()])  # a Linear layer's weight
            expected[f"{theirs_prefix}.{kind}"] = (f"{our_prefix}.{kind}", shape)

    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{name!r} is not a VGG16 state dict: missing key {_listed(missing)}")
    unexpected = sorted(set(state) - set(expected) - IGNORED_TORCHVISION_KEYS, key=str)
    if unexpected:
        raise ValueError(
            f"{name!r} is not a VGG16 state dict: unexpected key {_listed(unexpected)}"
        )
    converted = {}
    for key, (our_key, shape) in expected.items():
        tensor = state[key]
        if not isinstance(tensor, Tensor) or tensor.shape != shape:
            found = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{name!r}: key {key!r} has shape {found}, expected {tuple(shape)}")
        converted[our_key] = tensor.reshape(ours[our_key].shape)
    return converted


def load_torchvision_vgg16(backbone: VGG16Backbone, path: str | os.PathLike[str]) -> None:
    """Load the torchvision-format VGG16 state dict at ``path`` into a full-width ``backbone``
    (see :func:`read_torchvision_vgg16`); raises ValueError naming the file if the backbone
    is narrower or the file does not fit."""
    if backbone.width != 1.0:
        raise ValueError(
            f"pretrained VGG16 weights {os.fspath(path)!r} need width=1.0, "
            f"got width={backbone.width}"
        )
    backbone.load_state_dict(read_torchvision_vgg16(path))


def _listed(keys: list[str]) -> str:
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return f"{keys[0]!r}{more}"
