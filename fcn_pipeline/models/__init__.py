"""FCN-32s, FCN-16s and FCN-8s on a convolutionalized VGG16, faithful to the FCN paper.

``build_fcn`` is the entry point; ``init_from_coarser`` stages training (32s -> 16s -> 8s)
and ``parameter_groups`` gives the reference's optimizer groups (biases at 2x lr, no decay).
``geometry="same"`` and ``norm="batch"`` (:data:`GEOMETRIES`, :data:`NORMS`) are optional
departures from the paper: no 100-pixel padding, and BatchNorm in the backbone.
"""

from fcn_pipeline.models.fcn import (
    BACKBONES,
    VARIANTS,
    FCN8s,
    FCN16s,
    FCN32s,
    build_fcn,
    crop,
    fuse,
    fusion_crop,
    init_from_coarser,
    output_stride,
    parameter_groups,
)
from fcn_pipeline.models.geometry import GEOMETRIES, Grid
from fcn_pipeline.models.upsample import (
    UPSAMPLE_MODES,
    BilinearResize,
    bilinear_deconv,
    bilinear_kernel,
    bilinear_upsample_weight,
)
from fcn_pipeline.models.vgg16 import (
    NORMS,
    VGG16Backbone,
    load_torchvision_vgg16,
    read_torchvision_vgg16,
)

__all__ = [
    "BACKBONES",
    "GEOMETRIES",
    "NORMS",
    "UPSAMPLE_MODES",
    "VARIANTS",
    "BilinearResize",
    "FCN8s",
    "FCN16s",
    "FCN32s",
    "Grid",
    "VGG16Backbone",
    "bilinear_deconv",
    "bilinear_kernel",
    "bilinear_upsample_weight",
    "build_fcn",
    "crop",
    "fuse",
    "fusion_crop",
    "init_from_coarser",
    "load_torchvision_vgg16",
    "output_stride",
    "parameter_groups",
    "read_torchvision_vgg16",
]
