"""Staged training: FCN-16s starts from a trained FCN-32s, FCN-8s from a trained FCN-16s.

The finer net copies the coarser one's layers and its new skip layers start at zero, so
before any training it predicts from the coarser net's scores alone. (Its output is not
bit-identical to the coarser net's: a bilinear 2x step followed by a 16x one is not the
same interpolation as one 32x step, so the test compares with the coarser scores upsampled
along the finer net's own path.)
"""

import pytest
import torch
from torch import nn

from fcn_pipeline.models import build_fcn, init_from_coarser

WIDTH = 0.0625


def _trained(variant, upsample="frozen", num_classes=4, seed=0):
    """A net whose trainable layers, score and learned upsampling layers included, are all
    non-trivial, as if trained: a copy that skipped anything, or a skip that did not start
    at zero, shows."""
    torch.manual_seed(seed)
    model = build_fcn(variant, num_classes, width=WIDTH, upsample=upsample)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue  # frozen bilinear kernels stay bilinear
            if name.startswith(("score_", "upscore")):
                parameter.add_(0.1 * torch.randn_like(parameter))
            elif name.endswith("bias"):
                parameter.add_(0.01 * torch.randn_like(parameter))
    return model.eval()


def _record_inputs(model, names):
    """Run-time inputs of the named layers, filled in by forward pre-hooks."""
    inputs = {}
    for name in names:
        getattr(model, name).register_forward_pre_hook(
            lambda _module, args, name=name: inputs.__setitem__(name, args[0])
        )
    return inputs


def _predicts_nearly_the_same(fine, coarse, upsample):
    # same scores, a slightly smoother upsampling (unless learned kernels differ)
    if upsample != "learned":
        assert (fine.argmax(1) == coarse.argmax(1)).float().mean() > 0.9


@pytest.mark.parametrize("upsample", ["frozen", "learned", "interp"])
def test_fcn16s_from_fcn32s_starts_from_its_scores(upsample):
    fcn32s = _trained("fcn32s", upsample)
    fcn16s = build_fcn("fcn16s", 4, width=WIDTH, upsample=upsample)
    assert init_from_coarser(fcn16s, fcn32s.state_dict()) is fcn16s
    fcn16s.eval()

    coarse = _record_inputs(fcn32s, ["upscore"])  # FCN-32s's scores of fc7
    fine = _record_inputs(fcn16s, ["upscore2", "upscore16"])
    x = torch.randn(1, 3, 75, 98)
    with torch.no_grad():
        coarse_output, output = fcn32s(x), fcn16s(x)
        offset = fcn16s.crop_offsets["upscore16"]  # 27 (3 with interp)
        expected = fcn16s.upscore16(fcn16s.upscore2(coarse["upscore"]))
        expected = expected[..., offset : offset + 75, offset : offset + 98]
    assert torch.equal(fine["upscore2"], coarse["upscore"])  # same backbone and score_fr
    assert torch.equal(fine["upscore16"], fcn16s.upscore2(coarse["upscore"]))  # pool4 adds 0
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    _predicts_nearly_the_same(output, coarse_output, upsample)


@pytest.mark.parametrize("upsample", ["frozen", "learned", "interp"])
def test_fcn8s_from_fcn16s_starts_from_its_scores(upsample):
    fcn16s = _trained("fcn16s", upsample)
    fcn8s = build_fcn("fcn8s", 4, width=WIDTH, upsample=upsample)
    fcn8s = init_from_coarser(fcn8s, fcn16s.state_dict()).eval()
    shared = fcn16s.state_dict()
    for key, tensor in fcn8s.state_dict().items():
        if key in shared:  # backbone, score_fr, score_pool4 and upscore2
            assert torch.equal(tensor, shared[key]), key
        elif key.startswith("score_pool3"):
            assert not tensor.any(), key

    coarse = _record_inputs(fcn16s, ["upscore16"])  # FCN-16s's fused fc7 + pool4 scores
    fine = _record_inputs(fcn8s, ["upscore_pool4", "upscore8"])
    x = torch.randn(1, 3, 75, 98)
    with torch.no_grad():
        coarse_output, output = fcn16s(x), fcn8s(x)
        offset = fcn8s.crop_offsets["upscore8"]  # 31 (3 with interp)
        expected = fcn8s.upscore8(fcn8s.upscore_pool4(coarse["upscore16"]))
        expected = expected[..., offset : offset + 75, offset : offset + 98]
    assert torch.equal(fine["upscore_pool4"], coarse["upscore16"])
    assert torch.equal(fine["upscore8"], fcn8s.upscore_pool4(coarse["upscore16"]))  # pool3 adds 0
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    _predicts_nearly_the_same(output, coarse_output, upsample)


def test_staged_copy_covers_every_shared_parameter():
    fcn32s = _trained("fcn32s", "learned")
    fcn16s = init_from_coarser(
        build_fcn("fcn16s", 4, width=WIDTH, upsample="learned"), fcn32s.state_dict()
    )
    theirs = fcn32s.state_dict()
    for key, tensor in fcn16s.state_dict().items():
        if key in theirs:
            assert torch.equal(tensor, theirs[key]), key
        else:  # only the new layers are left as built
            assert key.startswith(("score_pool4", "upscore2", "upscore16")), key
    assert not fcn16s.score_pool4.weight.any() and not fcn16s.score_pool4.bias.any()


def test_refuses_a_state_dict_without_the_backbone():
    fcn32s = _trained("fcn32s")
    state = {k: v for k, v in fcn32s.state_dict().items() if k != "backbone.conv3_2.weight"}
    with pytest.raises(ValueError, match=r"'backbone\.conv3_2\.weight'"):
        init_from_coarser(build_fcn("fcn16s", 4, width=WIDTH), state)
    state = {k: v for k, v in fcn32s.state_dict().items() if not k.startswith("score_fr")}
    with pytest.raises(ValueError, match=r"'score_fr\.(weight|bias)'"):
        init_from_coarser(build_fcn("fcn16s", 4, width=WIDTH), state)


def test_refuses_another_number_of_classes_or_width():
    fcn32s = _trained("fcn32s", num_classes=4)
    with pytest.raises(ValueError, match=r"'score_fr\.weight'.*\(4, 256, 1, 1\)"):
        init_from_coarser(build_fcn("fcn16s", 21, width=WIDTH), fcn32s.state_dict())
    with pytest.raises(ValueError, match=r"'backbone\.conv1_1\.weight'"):
        init_from_coarser(build_fcn("fcn16s", 4, width=0.125), fcn32s.state_dict())


def test_fcn8s_at_once_can_start_from_vgg16_layers_of_any_net():
    # the at-once net trains from VGG16 directly; staging it from FCN-32s also just works
    fcn32s = _trained("fcn32s")
    at_once = init_from_coarser(build_fcn("fcn8s_atonce", 4, width=WIDTH), fcn32s.state_dict())
    assert torch.equal(at_once.score_fr.weight, fcn32s.score_fr.weight)
    assert isinstance(at_once.score_pool3, nn.Conv2d) and not at_once.score_pool3.weight.any()
