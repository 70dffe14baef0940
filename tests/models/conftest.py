"""Shared settings and helpers of the model tests."""

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """Run the model tests on one thread: their nets are narrow, so a second thread buys
    little, and on a busy 2-core machine oversubscribed threads made the suite 3x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def position_probe(model, source):
    """Turn ``model`` into a ruler: every conv passes channels 0 and 1 through its centre tap,
    and only the score layer ``source`` is non-zero, reading (channel 0 - channel 1) / 2.

    Fed a = C + h + w and b = C - h - w, each max-pool keeps the far end of its block in a
    and the near end in b, so (a - b) / 2 is the block centre's h + w: every score pixel
    holds the input position it lies on, and an aligned net outputs h + w at pixel (h, w).
    """
    with torch.no_grad():
        for module in model.backbone.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.zero_()
                module.bias.zero_()
                centre = module.kernel_size[0] // 2
                module.weight[0, 0, centre, centre] = 1
                module.weight[1, 1, centre, centre] = 1
        for name, module in model.named_modules():
            if name.startswith("score_"):
                module.weight.zero_()
                module.bias.zero_()
        scale = {"score_pool4": "scale_pool4", "score_pool3": "scale_pool3"}.get(source)
        gain = 0.5 / getattr(model, scale, 1.0) if scale else 0.5
        getattr(model, source).weight[:, 0] = gain
        getattr(model, source).weight[:, 1] = -gain
    return model.eval()
