"""norm="batch": a BatchNorm2d between every backbone convolution and its ReLU."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fcn_pipeline.models import (
    GEOMETRIES,
    VGG16Backbone,
    build_fcn,
    init_from_coarser,
    parameter_groups,
)
from fcn_pipeline.models.vgg16 import VGG16_LAYERS

SMALL = 0.0625
CONVS = [name for name, spec in VGG16_LAYERS if spec != "pool"] + ["fc6", "fc7"]
NORMED = {name: "bn" + name.removeprefix("conv").removeprefix("fc") for name in CONVS}


def _with_statistics(model, steps=3, size=(2, 3, 40, 56), seed=0):
    """``model`` after a few training-mode forward passes (running statistics away from
    their initial 0 and 1) and with non-trivial BatchNorm scales, shifts and score layers."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(std=0.1)
            elif name.startswith("score_"):
                nn.init.normal_(module.weight, std=0.1)
        model.train()
        for _ in range(steps):
            model(torch.randn(*size))
    return model.eval()


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_a_batch_norm_follows_every_backbone_conv(geometry):
    backbone = VGG16Backbone(SMALL, geometry=geometry, norm="batch")
    assert backbone.norm == "batch"
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == len(CONVS) == 15
    for conv_name, bn_name in NORMED.items():
        conv, bn = getattr(backbone, conv_name), getattr(backbone, bn_name)
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels
        assert conv.bias is None  # BatchNorm's shift replaces it
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any()
    plain = VGG16Backbone(SMALL, geometry=geometry)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert all(getattr(plain, name).bias is not None for name in CONVS)


def test_each_batch_norm_sits_between_its_conv_and_the_relu():
    backbone = VGG16Backbone(SMALL, geometry="same", norm="batch").train()
    seen = {}

    def remember(name):
        # clones: the ReLU after a BatchNorm works in place
        return lambda _m, args, out: seen.update({name: (args[0].clone(), out.clone())})

    for name in [*CONVS, *NORMED.values()]:
        getattr(backbone, name).register_forward_hook(remember(name))
    backbone(torch.randn(2, 3, 33, 47))
    for conv_name, bn_name in NORMED.items():
        assert torch.equal(seen[bn_name][0], seen[conv_name][1]), bn_name  # conv -> BN
    # BN -> ReLU -> next conv, wherever no pool (or dropout, active in train mode) sits between
    following = {a: b for a, b in itertools.pairwise(CONVS) if a.split("_")[0] == b.split("_")[0]}
    assert len(following) == 8
    for conv_name, next_name in following.items():
        bn_output = seen[NORMED[conv_name]][1]
        assert bn_output.min() < 0  # so the ReLU has something to cut
        assert torch.equal(seen[next_name][0], F.relu(bn_output)), next_name


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_eval_mode_is_deterministic_and_independent_of_the_batch(geometry):
    model = _with_statistics(build_fcn("fcn8s", 3, width=SMALL, geometry=geometry, norm="batch"))
    x = torch.randn(3, 3, 37, 45)
    with torch.no_grad():
        first, second, alone = model(x), model(x), model(x[:1])
        model.train()
        in_training = model(x)
    assert first.shape == (3, 3, 37, 45)
    assert torch.equal(first, second)
    torch.testing.assert_close(alone, first[:1], atol=1e-5, rtol=1e-5)  # running statistics
    assert not torch.allclose(in_training, first, atol=1e-3)  # batch statistics (and dropout)


def test_training_updates_the_running_statistics_and_the_norm_parameters():
    torch.manual_seed(0)
    model = build_fcn("fcn32s", 3, width=SMALL, geometry="same", norm="batch")
    nn.init.normal_(model.score_fr.weight, std=0.1)
    bn = model.backbone.bn3_2
    optimizer = torch.optim.Adam(parameter_groups(model, 1e-2, 5e-4))
    x = torch.randn(2, 3, 40, 56).to(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    loss = F.cross_entropy(model(x), torch.randint(0, 3, (2, 40, 56)))
    loss.backward()
    optimizer.step()
    assert bn.running_mean.any()
    assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    assert int(bn.num_batches_tracked) == 1
    assert not torch.equal(bn.weight, torch.ones_like(bn.weight)) and bn.bias.any()


def test_staged_initialisation_copies_the_running_statistics():
    fcn32s = _with_statistics(build_fcn("fcn32s", 4, width=SMALL, geometry="same", norm="batch"))
    fcn16s = build_fcn("fcn16s", 4, width=SMALL, geometry="same", norm="batch")
    fcn16s = init_from_coarser(fcn16s, fcn32s.state_dict()).eval()
    theirs = fcn32s.state_dict()
    buffers = [key for key in theirs if key.endswith(("running_mean", "running_var"))]
    assert len(buffers) == 2 * 15
    for key in buffers + [key.replace("running_mean", "num_batches_tracked") for key in buffers]:
        assert torch.equal(fcn16s.state_dict()[key], theirs[key]), key
    assert int(fcn16s.backbone.bn1_1.num_batches_tracked) == 3
    # so the finer net starts from the coarser one's scores, as without BatchNorm
    scores = {}
    fcn32s.upscore.register_forward_pre_hook(lambda _m, a: scores.update(coarse=a[0]))
    fcn16s.upscore2.register_forward_pre_hook(lambda _m, a: scores.update(fine=a[0]))
    with torch.no_grad():
        x = torch.randn(1, 3, 50, 70)
        fcn32s(x), fcn16s(x)
    assert torch.equal(scores["fine"], scores["coarse"])


def test_staged_initialisation_refuses_another_norm():
    plain = build_fcn("fcn32s", 4, width=SMALL, geometry="same")
    normed = build_fcn("fcn32s", 4, width=SMALL, geometry="same", norm="batch")
    with pytest.raises(ValueError, match=r"'backbone\.conv1_1\.bias'.*lacks.*norm"):
        init_from_coarser(build_fcn("fcn16s", 4, width=SMALL, norm="batch"), plain.state_dict())
    with pytest.raises(ValueError, match=r"'backbone\.bn1_1\.weight'.*lacks.*norm"):
        init_from_coarser(build_fcn("fcn16s", 4, width=SMALL), normed.state_dict())


def test_norm_parameters_get_their_own_group_without_weight_decay():
    model = build_fcn("fcn8s", 3, width=SMALL, upsample="learned", norm="batch")
    groups = {group["name"]: group for group in parameter_groups(model, 1e-4, 5e-4)}
    norm_ids = {
        id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
    }
    assert {id(p) for p in groups["norm"]["params"]} == norm_ids and len(norm_ids) == 30
    assert (groups["norm"]["lr"], groups["norm"]["weight_decay"]) == (1e-4, 0.0)
    assert (groups["weights"]["lr"], groups["weights"]["weight_decay"]) == (1e-4, 5e-4)
    assert (groups["biases"]["lr"], groups["biases"]["weight_decay"]) == (2e-4, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    # without conv biases in the backbone, only the score layers' biases remain
    assert {names[id(p)] for p in groups["biases"]["params"]} == {
        "score_fr.bias",
        "score_pool4.bias",
        "score_pool3.bias",
    }
    grouped = [id(p) for group in groups.values() for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)


def test_parameter_count_trades_conv_biases_for_scales_and_shifts():
    with torch.device("meta"):
        plain = build_fcn("fcn8s", 21, width=1.0)
        normed = build_fcn("fcn8s", 21, width=1.0, norm="batch")
    conv_channels = sum(int(spec) for _, spec in VGG16_LAYERS if spec != "pool")
    assert conv_channels == 4224
    extra = conv_channels + 2 * 4096  # one more parameter per channel: 2 for BN, -1 bias
    count = sum(p.numel() for p in normed.parameters() if p.requires_grad)
    assert count == sum(p.numel() for p in plain.parameters() if p.requires_grad) + extra


def test_pretrained_weights_with_batch_norm_are_refused_naming_both():
    # refused before the file is read: the VGG16 weights were learned without BatchNorm
    with pytest.raises(ValueError) as error:
        build_fcn("fcn32s", 21, pretrained="vgg16-weights.pth", norm="batch")
    for word in ("vgg16-weights.pth", "norm='batch'", "pretrained"):
        assert word in str(error.value)


@pytest.mark.parametrize("variant", ["fcn32s", "fcn16s", "fcn8s_atonce"])
def test_batch_norm_keeps_the_output_size(variant):
    model = build_fcn(variant, 2, width=1 / 64, geometry="same", norm="batch").eval()
    assert (model.geometry, model.norm) == ("same", "batch")
    with torch.no_grad():
        for height, width in [(1, 1), (17, 33), (64, 95)]:
            assert model(torch.randn(1, 3, height, width)).shape == (1, 2, height, width)
