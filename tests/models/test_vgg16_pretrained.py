"""Loading a torchvision VGG16 state dict: exact convolutionalization of fc6/fc7, and refusals."""

import pytest
import torch
import torchvision

from fcn_pipeline.models import build_fcn, load_torchvision_vgg16, read_torchvision_vgg16
from fcn_pipeline.models.vgg16 import VGG16Backbone, torchvision_vgg16_keys


@pytest.fixture(scope="module")
def vgg16():
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).eval()  # random weights, nothing downloaded


@pytest.fixture(scope="module")
def vgg16_file(vgg16, tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg16") / "vgg16.pth"
    torch.save(vgg16.state_dict(), path)
    return path


def test_key_map_follows_torchvision_layout():
    keys = torchvision_vgg16_keys()
    assert keys["features.0"] == "conv1_1"
    assert keys["features.28"] == "conv5_3"
    assert (keys["classifier.0"], keys["classifier.3"]) == ("fc6", "fc7")
    assert len(keys) == 15


@pytest.mark.slow  # the full-width VGG16, 138 M weights: 3.5 s
def test_pretrained_weights_are_convolutionalized_exactly(vgg16, vgg16_file):
    model = build_fcn("fcn8s", 21, pretrained=vgg16_file).eval()
    theirs = vgg16.state_dict()
    net = model.backbone
    assert torch.equal(net.conv1_1.weight, theirs["features.0.weight"])
    assert torch.equal(net.conv5_3.bias, theirs["features.28.bias"])
    assert torch.equal(net.fc6.weight, theirs["classifier.0.weight"].view(4096, 512, 7, 7))
    assert torch.equal(net.fc6.bias, theirs["classifier.0.bias"])
    assert torch.equal(net.fc7.weight, theirs["classifier.3.weight"].view(4096, 4096, 1, 1))
    assert torch.equal(net.fc7.bias, theirs["classifier.3.bias"])
    for name in ("score_fr", "score_pool4", "score_pool3"):  # still zero
        assert not getattr(model, name).weight.any()

    # the convolutionalized fc6 -> fc7 on a 7x7 pool5 map is torchvision's classifier on it
    torch.manual_seed(1)
    pool5 = torch.randn(2, 512, 7, 7)
    with torch.no_grad():
        fc7 = torch.relu(net.fc7(torch.relu(net.fc6(pool5))))  # dropout is off in eval
        expected = vgg16.classifier[:5](torch.flatten(pool5, 1))  # fc6, ReLU, drop, fc7, ReLU
    assert fc7.shape == (2, 4096, 1, 1)
    torch.testing.assert_close(fc7[:, :, 0, 0], expected, rtol=1e-4, atol=1e-5)

    # every conv of the trunk in torchvision's order
    for theirs_prefix, ours_prefix in torchvision_vgg16_keys().items():
        if theirs_prefix.startswith("features."):
            mine = getattr(net, ours_prefix)
            assert torch.equal(mine.weight, theirs[f"{theirs_prefix}.weight"])
            assert torch.equal(mine.bias, theirs[f"{theirs_prefix}.bias"])
    assert all(p.requires_grad for p in net.parameters())


def _write(tmp_path, state, name="bad.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def fake_state():
    """A state dict of torchvision's names and shapes whose tensors are all one expanded zero,
    so that a file of it takes bytes, not 528 MB."""
    state = {}
    with torch.device("meta"):
        ours = VGG16Backbone(1.0).state_dict()
    for theirs, mine in torchvision_vgg16_keys().items():
        weight, bias = ours[f"{mine}.weight"].shape, ours[f"{mine}.bias"].shape
        if mine in ("fc6", "fc7"):
            weight = (weight[0], weight[1:].numel())
        state[f"{theirs}.weight"] = torch.zeros(()).expand(weight)
        state[f"{theirs}.bias"] = torch.zeros(()).expand(bias)
    return state


def test_fake_state_reads(tmp_path, fake_state):
    state = read_torchvision_vgg16(_write(tmp_path, fake_state, "zeros.pth"))
    assert state["fc6.weight"].shape == (4096, 512, 7, 7)
    assert state["fc7.weight"].shape == (4096, 4096, 1, 1)
    assert set(state) == {k for k in VGG16Backbone(1 / 64).state_dict()}


def test_refuses_a_missing_key(tmp_path, fake_state):
    state = dict(fake_state)
    del state["features.10.weight"]
    path = _write(tmp_path, state)
    with pytest.raises(ValueError, match=r"bad\.pth.*missing key 'features\.10\.weight'"):
        build_fcn("fcn32s", 21, pretrained=path)


def test_refuses_an_unexpected_key(tmp_path, fake_state):
    state = dict(fake_state)
    state["features.1.running_mean"] = torch.zeros(64)  # e.g. a vgg16_bn file
    path = _write(tmp_path, state)
    with pytest.raises(ValueError, match=r"bad\.pth.*unexpected key 'features\.1\.running_mean'"):
        build_fcn("fcn32s", 21, pretrained=path)


def test_refuses_a_wrong_shape(tmp_path, fake_state):
    state = fake_state | {"classifier.3.weight": torch.zeros(()).expand(4096, 2048)}
    path = _write(tmp_path, state)
    with pytest.raises(ValueError, match=r"bad\.pth.*'classifier\.3\.weight'.*\(4096, 2048\)"):
        build_fcn("fcn32s", 21, pretrained=path)


def test_refuses_a_file_that_is_not_a_state_dict(tmp_path):
    path = _write(tmp_path, [torch.zeros(3)], "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth.*list"):
        build_fcn("fcn32s", 21, pretrained=path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pth"):
        build_fcn("fcn32s", 21, pretrained=garbage)


def test_refuses_a_narrow_backbone(vgg16_file):
    with pytest.raises(ValueError, match=r"vgg16\.pth.*width=1\.0.*0\.5"):
        build_fcn("fcn32s", 21, width=0.5, pretrained=vgg16_file)
    with pytest.raises(ValueError, match=r"vgg16\.pth.*width=1\.0"):
        with torch.device("meta"):
            narrow = VGG16Backbone(0.5)
        load_torchvision_vgg16(narrow, vgg16_file)
