"""FCN-32s/16s/8s: parameter counts, output size and alignment, crops, options, dtypes."""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fcn_pipeline.models import (
    UPSAMPLE_MODES,
    VARIANTS,
    Grid,
    VGG16Backbone,
    build_fcn,
    output_stride,
    parameter_groups,
)
from tests.models.conftest import position_probe

SMALL = 0.0625  # 4 channels in conv1: fast on a CPU, same topology as the paper's net
TINY = 1 / 64  # 1 channel in conv1: for tests where only the geometry matters


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _randomise_scores(model, std=0.1):
    torch.manual_seed(0)
    for name, module in model.named_modules():
        if name.startswith("score_"):
            nn.init.normal_(module.weight, std=std)
            nn.init.normal_(module.bias, std=std)
    return model


@pytest.mark.parametrize(
    ("variant", "count"),
    [("fcn32s", 134_346_581), ("fcn16s", 134_357_354), ("fcn8s", 134_362_751)],
)
def test_trainable_parameter_counts_match_the_paper(variant, count):
    with torch.device("meta"):  # shapes only, no 500 MB allocation
        model = build_fcn(variant, 21, width=1.0, upsample="frozen")
    assert _trainable(model) == count
    parts = {
        "backbone.conv": 14_714_688,
        "backbone.fc": 119_545_856,
        "score_fr": 86_037,
        "score_pool4": 10_773 if variant != "fcn32s" else 0,
        "score_pool3": 5_397 if variant == "fcn8s" else 0,
    }
    for prefix, expected in parts.items():
        found = sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))
        assert found == expected, prefix


def test_width_scales_every_channel_count_and_keeps_the_topology():
    with torch.device("meta"):
        full = build_fcn("fcn8s", 21, width=1.0, upsample="frozen").state_dict()
        narrow = build_fcn("fcn8s", 21, width=0.125, upsample="frozen").state_dict()
    assert list(full) == list(narrow)
    for key, tensor in full.items():
        if key.startswith("backbone.") and tensor.ndim == 4:
            out_channels, in_channels, *kernel = narrow[key].shape
            assert out_channels == max(1, round(tensor.shape[0] * 0.125))
            assert in_channels == (3 if "conv1_1" in key else max(1, round(tensor.shape[1] / 8)))
            assert kernel == list(tensor.shape[2:])
    tiny = build_fcn("fcn32s", 2, width=1e-6)  # every layer keeps at least one channel
    assert tiny.backbone.fc7.weight.shape == (1, 1, 1, 1)


SIZES = [(1, 1), (1, 9), (2, 3), (17, 33), (32, 32), (33, 31), (64, 95), (187, 253), (500, 375)]


@pytest.mark.parametrize("upsample", UPSAMPLE_MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_output_has_the_input_size(variant, upsample):
    model = build_fcn(variant, 5, width=TINY, upsample=upsample).eval()
    with torch.no_grad():
        for height, width in SIZES:
            scores = model(torch.randn(1, 3, height, width))
            assert scores.shape == (1, 5, height, width)
            assert scores.dtype == torch.float32


@pytest.mark.parametrize("upsample", ["frozen", "interp"])
@pytest.mark.parametrize("variant", ["fcn32s", "fcn16s", "fcn8s"])
def test_every_residue_of_the_input_size_fits_the_crops(variant, upsample):
    # map sizes depend on H through ceil(H / 2^k), k <= 5: 32 consecutive sizes cover all cases
    model = build_fcn(variant, 2, width=TINY, upsample=upsample).eval()
    with torch.no_grad():
        for height in range(1, 34):
            width = 34 - height
            assert model(torch.randn(1, 3, height, width)).shape == (1, 2, height, width)


REFERENCE_CROPS = {
    "fcn32s": {"upscore": 19},
    "fcn16s": {"score_pool4": 5, "upscore16": 27},
    "fcn8s": {"score_pool4": 5, "score_pool3": 9, "upscore8": 31},
    "fcn8s_atonce": {"score_pool4": 5, "score_pool3": 9, "upscore8": 31},
}
# bilinear resizing leaves out the f/2 faded border pixels of each deconvolution
INTERP_CROPS = {
    "fcn32s": {"upscore": 3},
    "fcn16s": {"score_pool4": 6, "upscore16": 3},
    "fcn8s": {"score_pool4": 6, "score_pool3": 12, "upscore8": 3},
    "fcn8s_atonce": {"score_pool4": 6, "score_pool3": 12, "upscore8": 3},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_crop_offsets_derived_from_the_geometry_equal_the_reference(variant):
    for upsample in ("frozen", "learned"):
        model = build_fcn(variant, 3, width=SMALL, upsample=upsample)
        assert model.crop_offsets == REFERENCE_CROPS[variant]
    assert (
        build_fcn(variant, 3, width=SMALL, upsample="interp").crop_offsets
        == (INTERP_CROPS[variant])
    )


def test_backbone_maps_lie_where_the_padding_and_pools_put_them():
    # conv1_1's 100-pixel pad and the 2x2 pools centre pool3's pixel i on input 8i - 95.5 ...
    grids = VGG16Backbone(TINY).grids
    assert grids["pool3"] == Grid(Fraction(8), Fraction(-191, 2))
    assert grids["pool4"] == Grid(Fraction(16), Fraction(-183, 2))
    # ... and fc6's 7x7 window centres fc7's pixel i on input 32i + 12.5
    assert grids["fc7"] == Grid(Fraction(32), Fraction(25, 2))
    with pytest.raises(ValueError, match="cannot be cropped"):  # half a pixel apart
        Grid(Fraction(2), Fraction(1, 2)).offset_onto(Grid(Fraction(2), Fraction(3, 2)))


PROBES = [
    ("fcn32s", "score_fr"),
    ("fcn16s", "score_fr"),
    ("fcn16s", "score_pool4"),
    ("fcn8s", "score_fr"),
    ("fcn8s", "score_pool4"),
    ("fcn8s", "score_pool3"),
    ("fcn8s_atonce", "score_pool4"),
    ("fcn8s_atonce", "score_pool3"),
]


@pytest.mark.parametrize("upsample", UPSAMPLE_MODES)
@pytest.mark.parametrize(("variant", "source"), PROBES)
def test_scores_are_aligned_with_the_input(variant, source, upsample):
    height, width = 320, 384
    model = build_fcn(variant, 2, width=1 / 32, upsample=upsample)  # 2 channels in conv1
    model = position_probe(model, source)
    rows = torch.arange(height, dtype=torch.float64)[:, None]
    cols = torch.arange(width, dtype=torch.float64)[None, :]
    offset = height + width + 10  # keeps both ramps positive, so the ReLUs pass them
    image = torch.stack([offset + rows + cols, offset - rows - cols, 0 * rows + 0 * cols])
    with torch.no_grad():
        scores = model.double()(image[None])
    # away from the border, where the scores come from pools and fc6 that see only image
    # pixels, not padding (a margin of about two fc7 cells)
    inner = (slice(96, height - 64), slice(96, width - 64))
    expected = (rows + cols)[inner]
    for k in range(2):
        torch.testing.assert_close(scores[0, k][inner], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(96, 130), (187, 253)])
def test_fcn32s_frozen_and_interp_agree_inside_the_faded_border(size):
    # Same crop, shifted by the 16 pixels the resize leaves out: equal wherever two coarse
    # cells reach a pixel (rows 13 onwards), while the first 13 rows and last <= 16 rows lie
    # where the deconvolution fades towards zero (and interpolate replicates the edge).
    frozen = _randomise_scores(build_fcn("fcn32s", 4, width=SMALL, upsample="frozen")).eval()
    interp = build_fcn("fcn32s", 4, width=SMALL, upsample="interp").eval()
    interp.load_state_dict(frozen.state_dict(), strict=False)  # all but upscore.weight
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        a, b = interp(x), frozen(x)
    inner = (..., slice(13, size[0] - 16), slice(13, size[1] - 16))
    torch.testing.assert_close(a[inner], b[inner], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[..., 0, :], b[..., 0, :], atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_stride(variant):
    expected = {"fcn32s": 32, "fcn16s": 16, "fcn8s": 8, "fcn8s_atonce": 8}[variant]
    assert output_stride(variant) == expected
    assert build_fcn(variant, 3, width=SMALL).output_stride == expected
    assert build_fcn(variant, 3, width=SMALL).variant == variant


def test_at_once_scales_the_skips():
    staged, at_once = build_fcn("fcn8s", 3, width=SMALL), build_fcn("fcn8s_atonce", 3, width=SMALL)
    assert (staged.scale_pool4, staged.scale_pool3) == (1.0, 1.0)
    assert (at_once.scale_pool4, at_once.scale_pool3) == (0.01, 0.0001)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"variant": "fcn4s"}, ["'fcn4s'", "fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce"]),
        ({"backbone": "resnet50"}, ["'resnet50'", "vgg16"]),
        ({"upsample": "nearest"}, ["'nearest'", "learned", "frozen", "interp"]),
        ({"num_classes": 0}, ["num_classes", "0"]),
        ({"num_classes": 2.5}, ["num_classes", "2.5"]),
        ({"width": 0.0}, ["width", "0.0"]),
        ({"width": -0.5}, ["width", "-0.5"]),
        ({"width": float("nan")}, ["width", "nan"]),
        ({"pretrained": "vgg16.pth", "width": 0.5}, ["vgg16.pth", "width=1.0", "0.5"]),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, words):
    arguments = {"variant": "fcn32s", "num_classes": 21, "width": SMALL} | kwargs
    variant, num_classes = arguments.pop("variant"), arguments.pop("num_classes")
    with pytest.raises(ValueError) as error:
        build_fcn(variant, num_classes, **arguments)
    for word in words:
        assert word in str(error.value)


def test_parameter_groups_put_biases_at_twice_the_rate_without_decay():
    model = build_fcn("fcn8s", 3, width=SMALL, upsample="frozen")
    groups = parameter_groups(model, lr=1e-4, weight_decay=5e-4)
    by_name = {group["name"]: group for group in groups}
    assert (by_name["weights"]["lr"], by_name["weights"]["weight_decay"]) == (1e-4, 5e-4)
    assert (by_name["biases"]["lr"], by_name["biases"]["weight_decay"]) == (2e-4, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(".bias") for p in by_name["biases"]["params"])
    assert all(names[id(p)].endswith(".weight") for p in by_name["weights"]["params"])
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    torch.optim.SGD(groups, lr=1e-4, momentum=0.99)  # accepted as they are

    learned = build_fcn("fcn8s", 3, width=SMALL, upsample="learned")
    grouped = {id(p) for group in parameter_groups(learned, 1e-4, 5e-4) for p in group["params"]}
    assert id(learned.upscore8.weight) in grouped


@pytest.mark.parametrize("upsample", UPSAMPLE_MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_autocast_and_channels_last(variant, upsample):
    model = _randomise_scores(build_fcn(variant, 3, width=SMALL, upsample=upsample)).eval()
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x)
        assert mixed.shape == (2, 3, 45, 61) and torch.isfinite(mixed).all()
        model = model.to(memory_format=torch.channels_last)
        last = model(x.to(memory_format=torch.channels_last))
    assert last.shape == (2, 3, 45, 61) and torch.isfinite(last).all()
    torch.testing.assert_close(last, reference, atol=1e-4, rtol=1e-4)
    assert (mixed.float() - reference).abs().max() < 0.05 * reference.abs().max() + 1e-3


def test_channels_last_training_step_under_autocast():
    model = _randomise_scores(build_fcn("fcn8s", 3, width=SMALL, upsample="learned"))
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 40, 56).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), torch.randint(0, 3, (2, 40, 56)))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("upsample", UPSAMPLE_MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_never_reads_tensor_values_on_the_host(variant, upsample):
    # meta tensors have no data: .item(), .cpu() or branching on a value would raise here
    with torch.device("meta"):
        model = build_fcn(variant, 3, width=SMALL, upsample=upsample)
        scores = model(torch.empty(2, 3, 37, 29))
    assert scores.shape == (2, 3, 37, 29) and scores.device.type == "meta"
