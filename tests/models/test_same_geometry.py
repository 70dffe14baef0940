"""The "same" geometry: no 100-pixel padding, every map ceil(H / s) pixels, crops from Grid.

Also checks that the default "paper" geometry is the reference's net, unchanged.
"""

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fcn_pipeline.models import (
    GEOMETRIES,
    NORMS,
    UPSAMPLE_MODES,
    VARIANTS,
    Grid,
    VGG16Backbone,
    build_fcn,
    init_from_coarser,
)
from fcn_pipeline.models.upsample import upsampler
from tests.conftest import perturb_weights
from tests.models.conftest import position_probe

SMALL = 0.0625  # 4 channels in conv1
TINY = 1 / 64  # 1 channel in conv1: only the geometry matters

SIZES = [(1, 1), (1, 9), (2, 3), (7, 5), (17, 33), (31, 33), (33, 31), (64, 95), (187, 253)]


@pytest.mark.parametrize("upsample", UPSAMPLE_MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_output_has_the_input_size(variant, upsample):
    model = build_fcn(variant, 5, width=TINY, upsample=upsample, geometry="same").eval()
    assert (model.geometry, model.norm) == ("same", "none")
    with torch.no_grad():
        for height, width in SIZES:
            assert model(torch.randn(1, 3, height, width)).shape == (1, 5, height, width)


@pytest.mark.parametrize("upsample", UPSAMPLE_MODES)
@pytest.mark.parametrize("variant", ["fcn32s", "fcn16s", "fcn8s"])
def test_every_residue_of_the_input_size_fits_the_crops(variant, upsample):
    # map sizes depend on H through ceil(H / 2^k), k <= 5: 32 consecutive sizes cover all cases
    model = build_fcn(variant, 2, width=TINY, upsample=upsample, geometry="same").eval()
    with torch.no_grad():
        for height in range(1, 34):
            width = 34 - height
            assert model(torch.randn(1, 3, height, width)).shape == (1, 2, height, width)


def test_backbone_maps_cover_the_input_with_ceil_sizes_on_block_centres():
    backbone = VGG16Backbone(TINY, geometry="same").eval()
    assert backbone.conv1_1.padding == (1, 1) and backbone.fc6.padding == (3, 3)
    # pixel i of a stride-s map lies on the centre of input block i: s i + (s - 1) / 2
    assert backbone.grids == {
        "pool3": Grid(Fraction(8), Fraction(7, 2)),
        "pool4": Grid(Fraction(16), Fraction(15, 2)),
        "fc7": Grid(Fraction(32), Fraction(31, 2)),
    }
    with torch.no_grad():
        for height, width in [(1, 1), (33, 70), (96, 128)]:
            maps = backbone(torch.randn(1, 3, height, width))
            for stride, found in zip((8, 16, 32), maps, strict=True):
                assert found.shape[-2:] == (math.ceil(height / stride), math.ceil(width / stride))


FUSIONS = {  # (upsampling layer, skip score layer, backbone map) of each fusion
    "fcn32s": [],
    "fcn16s": [("upscore2", "score_pool4", "pool4")],
    "fcn8s": [("upscore2", "score_pool4", "pool4"), ("upscore_pool4", "score_pool3", "pool3")],
}
FINAL = {"fcn32s": "upscore", "fcn16s": "upscore16", "fcn8s": "upscore8"}


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("upsample", UPSAMPLE_MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_crop_puts_both_maps_of_a_fusion_on_one_grid(variant, upsample, geometry):
    model = build_fcn(variant, 3, width=TINY, upsample=upsample, geometry=geometry)
    offsets, grids = model.crop_offsets, model.backbone.grids
    kind = variant.removesuffix("_atonce")
    coarse = grids["fc7"]  # followed through the model's own layers
    for upsampled_name, skip_name, pool in FUSIONS[kind]:
        upsampled, skip = coarse.after(getattr(model, upsampled_name)), grids[pool]
        # exactly one of the two maps is cropped: the skip in "paper", the upsampled in "same"
        assert (skip_name in offsets) != (upsampled_name in offsets)
        assert (upsampled_name in offsets) == (geometry == "same")
        if upsampled_name in offsets:
            assert upsampled.cropped(offsets[upsampled_name]) == skip
        else:
            assert skip.cropped(offsets[skip_name]) == upsampled
        coarse = skip if upsampled_name in offsets else upsampled  # the fused map's grid
    final = coarse.after(getattr(model, FINAL[kind]))
    assert final.cropped(offsets[FINAL[kind]]) == Grid()  # output pixel j on input pixel j
    assert len(offsets) == len(FUSIONS[kind]) + 1


@pytest.mark.parametrize("upsample", UPSAMPLE_MODES)
def test_same_keeps_each_skip_whole_and_crops_the_longer_upsampled_map(upsample):
    # 33 rows: pool5 has 2, so upscore2 has 4 where pool4 has 3, and upscore_pool4 has 6
    # where pool3 has 5; the fused maps take the skips' sizes
    model = build_fcn("fcn8s", 2, width=TINY, upsample=upsample, geometry="same").eval()
    seen = {}
    for name in ("upscore2", "upscore_pool4", "upscore8"):
        getattr(model, name).register_forward_hook(
            lambda _m, args, out, name=name: seen.update({name: (args[0].shape, out.shape)})
        )
    with torch.no_grad():
        model(torch.randn(1, 3, 33, 65))
    assert seen["upscore2"][1][-2:] == (4, 6)
    assert seen["upscore_pool4"][0][-2:] == (3, 5)  # pool4: ceil(33 / 16), ceil(65 / 16)
    assert seen["upscore_pool4"][1][-2:] == (6, 10)
    assert seen["upscore8"][0][-2:] == (5, 9)  # pool3: ceil(33 / 8), ceil(65 / 8)


PROBES = [
    ("fcn32s", "score_fr"),
    ("fcn16s", "score_fr"),
    ("fcn16s", "score_pool4"),
    ("fcn8s", "score_fr"),
    ("fcn8s", "score_pool4"),
    ("fcn8s", "score_pool3"),
    ("fcn8s_atonce", "score_pool3"),
]


@pytest.mark.parametrize("upsample", UPSAMPLE_MODES)
@pytest.mark.parametrize(("variant", "source"), PROBES)
def test_scores_are_aligned_with_the_input(variant, source, upsample):
    height, width = 192, 224  # multiples of 32: no partial pooling blocks at the far end
    model = build_fcn(variant, 2, width=1 / 32, upsample=upsample, geometry="same")
    model = position_probe(model, source).double()
    rows = torch.arange(height, dtype=torch.float64)[:, None]
    cols = torch.arange(width, dtype=torch.float64)[None, :]
    offset = height + width + 10  # keeps both ramps positive, so the ReLUs pass them
    image = torch.stack([offset + rows + cols, offset - rows - cols, 0 * rows + 0 * cols])
    with torch.no_grad():
        scores = model(image[None])
    # away from the borders, where the upsampling fades (or repeats edges): no padding to
    # keep clear of any more, so the margin is far below the paper geometry's 96
    inner = (slice(48, height - 48), slice(48, width - 48))
    for k in range(2):
        torch.testing.assert_close(scores[0, k][inner], (rows + cols)[inner], atol=1e-6, rtol=0)


@pytest.mark.parametrize("factor", [2, 8, 16, 32])
def test_padded_frozen_deconv_equals_bilinear_interpolation_away_from_the_border(factor):
    torch.manual_seed(factor)
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    deconv = upsampler(3, factor, "frozen", padded=True).double()
    resize = upsampler(3, factor, "interp", padded=True)
    with torch.no_grad():
        upsampled, resized = deconv(x), resize(x)
    assert upsampled.shape == resized.shape == (2, 3, 5 * factor, 7 * factor)
    band = factor // 2
    inner = (..., slice(band, -band), slice(band, -band))
    torch.testing.assert_close(upsampled[inner], resized[inner], atol=1e-9, rtol=0)
    assert not torch.allclose(upsampled[..., 0, 0], resized[..., 0, 0], atol=1e-5)


@pytest.mark.parametrize(("variant", "band"), [("fcn32s", 16), ("fcn16s", 24), ("fcn8s", 28)])
def test_frozen_and_interp_nets_share_crops_and_agree_away_from_the_border(variant, band):
    # The padded deconvolutions put the same pixels on the same points as the resizes, so
    # the crops are equal; they differ only where a deconvolution fades (f/2 pixels of each
    # step, widened by the later steps: 16 for FCN-32s, 16 + 8 for 16s, 16 + 8 + 4 for 8s).
    torch.manual_seed(0)
    frozen = build_fcn(variant, 3, width=SMALL, upsample="frozen", geometry="same")
    for name, module in frozen.named_modules():
        if name.startswith("score_"):
            nn.init.normal_(module.weight, std=0.1)
            nn.init.normal_(module.bias, std=0.1)
    frozen.eval()
    interp = build_fcn(variant, 3, width=SMALL, upsample="interp", geometry="same").eval()
    interp.load_state_dict(frozen.state_dict(), strict=False)  # all but the deconv kernels
    assert interp.crop_offsets == frozen.crop_offsets
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        a, b = frozen(x), interp(x)
    inner = (..., slice(band, -band), slice(band, -band))
    torch.testing.assert_close(a[inner], b[inner], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[..., 0, :], b[..., 0, :], atol=1e-3)


def _trained(variant, upsample, num_classes=4, seed=0):
    """A "same" net whose trainable layers are all non-trivial, as if trained."""
    torch.manual_seed(seed)
    model = build_fcn(variant, num_classes, width=SMALL, upsample=upsample, geometry="same")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            if name.startswith(("score_", "upscore")):
                parameter.add_(0.1 * torch.randn_like(parameter))
            elif name.endswith("bias"):
                parameter.add_(0.01 * torch.randn_like(parameter))
    return model.eval()


def _record_inputs(model, names):
    inputs = {}
    for name in names:
        getattr(model, name).register_forward_pre_hook(
            lambda _module, args, name=name: inputs.__setitem__(name, args[0])
        )
    return inputs


def _cropped(x, offset, size):
    return x[..., offset : offset + size[0], offset : offset + size[1]]


@pytest.mark.parametrize("upsample", UPSAMPLE_MODES)
def test_fcn16s_from_fcn32s_starts_from_its_scores(upsample):
    fcn32s = _trained("fcn32s", upsample)
    fcn16s = build_fcn("fcn16s", 4, width=SMALL, upsample=upsample, geometry="same")
    fcn16s = init_from_coarser(fcn16s, fcn32s.state_dict()).eval()
    coarse = _record_inputs(fcn32s, ["upscore"])
    fine = _record_inputs(fcn16s, ["upscore2", "upscore16", "score_pool4"])
    size = (75, 98)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        coarse_output, output = fcn32s(x), fcn16s(x)
        offsets = fcn16s.crop_offsets  # upscore2 cropped onto pool4, then onto the input
        upscore2 = fcn16s.upscore2(coarse["upscore"])
        fused = _cropped(upscore2, offsets["upscore2"], fine["score_pool4"].shape[-2:])
        expected = _cropped(fcn16s.upscore16(fused), offsets["upscore16"], size)
    assert torch.equal(fine["upscore2"], coarse["upscore"])  # same backbone and score_fr
    assert torch.equal(fine["upscore16"], fused)  # pool4 adds 0
    assert fused.shape[-2:] == (5, 7) and upscore2.shape[-2:] == (6, 8)  # really cropped
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    if upsample != "learned":  # same scores, a slightly smoother upsampling
        assert (output.argmax(1) == coarse_output.argmax(1)).float().mean() > 0.9


@pytest.mark.parametrize("upsample", UPSAMPLE_MODES)
def test_fcn8s_from_fcn16s_starts_from_its_scores(upsample):
    fcn16s = _trained("fcn16s", upsample)
    fcn8s = build_fcn("fcn8s", 4, width=SMALL, upsample=upsample, geometry="same")
    fcn8s = init_from_coarser(fcn8s, fcn16s.state_dict()).eval()
    shared = fcn16s.state_dict()
    for key, tensor in fcn8s.state_dict().items():
        if key in shared:
            assert torch.equal(tensor, shared[key]), key
        else:
            assert key.startswith(("score_pool3", "upscore_pool4", "upscore8")), key
    coarse = _record_inputs(fcn16s, ["upscore16"])
    fine = _record_inputs(fcn8s, ["upscore_pool4", "upscore8", "score_pool3"])
    size = (75, 98)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        coarse_output, output = fcn16s(x), fcn8s(x)
        offsets = fcn8s.crop_offsets
        upscore_pool4 = fcn8s.upscore_pool4(coarse["upscore16"])
        fused = _cropped(upscore_pool4, offsets["upscore_pool4"], fine["score_pool3"].shape[-2:])
        expected = _cropped(fcn8s.upscore8(fused), offsets["upscore8"], size)
    assert torch.equal(fine["upscore_pool4"], coarse["upscore16"])
    assert torch.equal(fine["upscore8"], fused)  # pool3 adds 0
    assert fused.shape[-2:] == (10, 13) and upscore_pool4.shape[-2:] == (10, 14)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    if upsample != "learned":
        assert (output.argmax(1) == coarse_output.argmax(1)).float().mean() > 0.9


@pytest.mark.parametrize(
    ("variant", "count"),
    [("fcn32s", 134_346_581), ("fcn16s", 134_357_354), ("fcn8s", 134_362_751)],
)
def test_paper_is_the_default_and_same_has_the_same_parameters(variant, count):
    with torch.device("meta"):
        default = build_fcn(variant, 21)
        paper = build_fcn(variant, 21, geometry="paper", norm="none")
        same = build_fcn(variant, 21, geometry="same")
    assert (default.geometry, default.norm) == ("paper", "none")
    assert default.backbone.conv1_1.padding == (100, 100) and default.backbone.fc6.padding == (0, 0)
    for model in (default, paper, same):
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count
    shapes = {key: tensor.shape for key, tensor in default.state_dict().items()}
    assert {key: tensor.shape for key, tensor in same.state_dict().items()} == shapes
    assert paper.crop_offsets == default.crop_offsets
    assert same.backbone.grids != default.backbone.grids


def test_explicit_paper_geometry_computes_what_the_default_does():
    """build_fcn's default is the paper's net. Every weight, the zero-initialised score
    layers included, is made non-zero first, so the outputs carry information: the
    same weights in the ``same`` geometry compute something else."""
    torch.manual_seed(0)
    default = perturb_weights(build_fcn("fcn8s", 3, width=SMALL).eval(), 0.1)
    paper = build_fcn("fcn8s", 3, width=SMALL, geometry="paper", norm="none").eval()
    paper.load_state_dict(default.state_dict())
    same = build_fcn("fcn8s", 3, width=SMALL, geometry="same", norm="none").eval()
    same.load_state_dict(default.state_dict())
    x = torch.randn(1, 3, 37, 50)
    with torch.no_grad():
        expected = default(x)
        assert expected.std() > 0 and expected.argmax(1).unique().numel() > 1
        assert torch.equal(expected, paper(x))
        assert not torch.allclose(expected, same(x))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"geometry": "valid"}, ["geometry", "'valid'", "paper", "same"]),
        ({"geometry": None}, ["geometry", "None", "paper", "same"]),
        ({"norm": "layer"}, ["norm", "'layer'", "none", "batch"]),
    ],
)
def test_unknown_geometry_or_norm_is_refused_naming_the_choices(kwargs, words):
    assert (GEOMETRIES, NORMS) == (("paper", "same"), ("none", "batch"))
    for build in (
        lambda: build_fcn("fcn8s", 3, width=SMALL, **kwargs),
        lambda: VGG16Backbone(SMALL, **kwargs),
    ):
        with pytest.raises(ValueError) as error:
            build()
        for word in words:
            assert word in str(error.value)


def test_same_geometry_trains_with_channels_last():
    torch.manual_seed(0)
    model = build_fcn("fcn8s", 3, width=SMALL, upsample="learned", geometry="same")
    for name, module in model.named_modules():
        if name.startswith("score_"):  # zero scores would pass no gradient to the backbone
            nn.init.normal_(module.weight, std=0.1)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 41, 57).to(memory_format=torch.channels_last)
    loss = F.cross_entropy(model(x), torch.randint(0, 3, (2, 41, 57)))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.backbone.conv1_1.weight.grad.abs().sum() > 0
