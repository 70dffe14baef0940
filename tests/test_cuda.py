"""The CUDA path: bfloat16 autocast, channels_last, training and evaluation on a GPU.

Every test here is marked ``cuda`` and skipped without a GPU; ``scripts/gpu-check.sh``
runs them (``pytest -m cuda``) whenever a GPU machine is lent.

Tolerances, measured on the CPU with bfloat16 autocast (oneDNN, fp32 accumulation,
the same rounding as cuDNN's bf16 kernels) on these very nets and sizes, and set at
about three times what was measured there:

- forward: relative L2 error of the scores <= 3e-2 (measured 0.6-1.0 %);
- loss: relative error <= 1e-2 (measured <= 0.2 %);
- gradients: relative L2 error of all gradients together <= 0.15 (measured 6-7 %),
  and cosine similarity >= 0.9 for every layer's gradient, weight and bias together
  (worst measured 0.957, conv1_1: its gradient has gone back through every layer).
  Per layer, not per tensor: on an H200 (torch 2.11, cuDNN 9.19) the bias of conv3_2
  alone reached cosine 0.626 in FCN-32s and the at-once FCN-8s, whose deep layers get
  small gradients; a bias gradient is a sum over every output position that largely
  cancels, so its own direction is ill-conditioned in any precision below float32;
- training: the first epoch's mean loss within 2 % of the CPU run's (measured 0.01 %);
- evaluation: CUDA (bf16) and CPU (fp32) confusion matrices of the same weights
  disagree on at most 2 % of the pixels (measured 0.45-0.77 % for FCN-8s with class
  scores centred so that classes compete everywhere); their row sums (ground truth)
  are equal exactly.

NCCL: one GPU holds one rank (NCCL refuses two ranks on one device), so the NCCL test
is a world of one: the process group, an exact integer all-reduce and a
DistributedDataParallel step in bf16/channels_last, whose gradients must equal the
unwrapped net's. Two and more ranks are tested with gloo on the CPU
(tests/test_distributed.py), through the same code.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fcn_pipeline import distributed
from fcn_pipeline.checkpoints import load_model

# The library API these tests exercise, imported in one place (training's helpers may
# move to another module: fix the imports here).
from fcn_pipeline.config import TrainParams
from fcn_pipeline.data import SegmentationDataset, eval_loader
from fcn_pipeline.losses import segmentation_loss
from fcn_pipeline.metrics import segmentation_scores
from fcn_pipeline.models import UPSAMPLE_MODES, VARIANTS, build_fcn
from fcn_pipeline.runtime import autocast, predict_batches
from fcn_pipeline.training import train_variant
from tests.conftest import free_port

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FORWARD_RTOL = 3e-2
LOSS_RTOL = 1e-2
GRAD_RTOL = 0.15
GRAD_MIN_COSINE = 0.9
EVAL_MAX_DISAGREEMENT = 0.02
NUM_CLASSES = 6
WIDTH = 0.25  # wide enough for realistic rounding, small enough for a second per case


@contextmanager
def exact_fp32():
    """No TF32 in cuDNN convolutions or matmuls: the float32 reference is float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def random_scoring_net(variant: str, upsample: str, seed: int = 0) -> torch.nn.Module:
    """An FCN with He-initialised score layers (zero ones make every score 0 and the
    comparison empty) and no dropout (its masks would differ between two passes)."""
    torch.manual_seed(seed)
    model = build_fcn(variant, NUM_CLASSES, width=WIDTH, upsample=upsample)
    model.backbone.drop6.p = model.backbone.drop7.p = 0.0
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.startswith("score"):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
    return model


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def forward_backward(model, images, labels, *, bf16: bool):
    """Scores, loss and ``{name: gradient}`` of one training step (no update)."""
    model.zero_grad(set_to_none=True)
    device = images.device
    with autocast(device) if bf16 else torch.autocast(device.type, enabled=False):
        scores = model(images)
    loss = segmentation_loss(scores, labels)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return scores.detach(), loss.detach(), grads


@pytest.mark.parametrize(("variant", "upsample"), list(itertools.product(VARIANTS, UPSAMPLE_MODES)))
def test_bf16_autocast_forward_and_backward_match_fp32(variant, upsample):
    check_bf16_matches_fp32(torch.device("cuda"), variant, upsample)


def check_bf16_matches_fp32(device: torch.device, variant: str, upsample: str) -> None:
    """bf16 autocast against float32 on ``device`` (the CPU runs it too, to measure)."""
    model = random_scoring_net(variant, upsample).to(device, memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 96, generator=generator).to(device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (2, 64, 96), generator=generator).to(device)

    coarse = []
    hook = model.score_fr.register_forward_hook(lambda m, i, out: coarse.append(out.dtype))
    with exact_fp32():
        scores32, loss32, grads32 = forward_backward(model, images, labels, bf16=False)
    scores16, loss16, grads16 = forward_backward(model, images, labels, bf16=True)
    hook.remove()

    # Autocast really ran the net in bf16: the class scores before upsampling are bf16.
    # The upsampled output too, except CUDA's autocast runs bilinear resizing
    # (upsample_bilinear2d, "interp") in float32 by policy.
    assert coarse[-1] == torch.bfloat16
    fp32_resize = upsample == "interp" and device.type == "cuda"
    assert scores16.dtype == (torch.float32 if fp32_resize else torch.bfloat16)
    assert scores32.dtype == torch.float32
    assert relative_error(scores16, scores32) <= FORWARD_RTOL
    assert abs(loss16.item() - loss32.item()) <= LOSS_RTOL * loss32.item()
    assert grads16.keys() == grads32.keys()
    if upsample == "learned":
        assert any(name.startswith("up") for name in grads32)  # upsampling is trained
    names = sorted(grads32)
    together16 = torch.cat([grads16[n].float().flatten() for n in names])
    together32 = torch.cat([grads32[n].flatten() for n in names])
    assert relative_error(together16, together32) <= GRAD_RTOL
    layers: dict[str, list[str]] = {}
    for name in names:
        layers.setdefault(name.rpartition(".")[0], []).append(name)
    cosines = {}
    for layer, members in layers.items():
        g16 = torch.cat([grads16[n].float().flatten() for n in members])
        g32 = torch.cat([grads32[n].flatten() for n in members])
        if g32.norm() > 0:
            cosines[layer] = F.cosine_similarity(g16, g32, dim=0).item()
    low = {layer: round(c, 3) for layer, c in cosines.items() if c < GRAD_MIN_COSINE}
    assert not low, f"layers below cosine {GRAD_MIN_COSINE}: {low}"


@pytest.mark.parametrize("variant", ["fcn32s", "fcn8s"])
def test_channels_last_propagates_and_matches_nchw(variant):
    """Every convolution of a channels_last net writes channels_last (no silent
    conversion back to NCHW), and its scores equal the NCHW net's."""
    device = torch.device("cuda")
    model = random_scoring_net(variant, "frozen").to(device)
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad(), autocast(device):
        nchw = model(images)
        model.to(memory_format=torch.channels_last)
        formats: dict[str, bool] = {}
        hooks = [
            module.register_forward_hook(
                lambda m, i, out, name=name: formats.__setitem__(
                    name, out.is_contiguous(memory_format=torch.channels_last)
                )
            )
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d)
        ]
        channels_last = model(images.contiguous(memory_format=torch.channels_last))
        for hook in hooks:
            hook.remove()
    assert formats and all(formats.values()), {n: f for n, f in formats.items() if not f}
    assert relative_error(channels_last, nchw) <= FORWARD_RTOL


def cuda_params(tiny_data: Path, out: Path, device: str, **changes) -> TrainParams:
    settings = {
        "data": str(tiny_data / "ingested"),
        "patches": str(tiny_data / "patches"),
        "stats": str(tiny_data / "stats"),
        "out": str(out),
        "width": 0.0625,
        "batch_size": 2,
        "eval_batch_size": 4,
        "device": device,
        "workers": 0,
        "seed": 5,
        **changes,
    }
    return TrainParams(**settings)


def test_training_loop_runs_on_cuda_and_follows_the_cpu_run(tiny_data, tmp_path):
    """A few staged steps on CUDA (pinned memory, bf16 autocast, channels_last): finite
    losses, weights that moved, a model.pt that reloads; the first epoch's loss close to
    the CPU run's from the same seed (SGD: its update is proportional to the gradient,
    so bf16 rounding moves it little)."""
    runs = {}
    for device in ("cuda", "cpu"):
        params = cuda_params(tiny_data, tmp_path / device, device, optimizer="sgd", lr=1e-2)
        runs[device] = train_variant(params, "fcn32s", 2, log=lambda _: None)
    cuda, cpu = runs["cuda"], runs["cpu"]
    assert len(cuda.history) == 2
    for epoch in cuda.history:
        assert torch.isfinite(torch.tensor(epoch["train_loss"]))
        assert epoch["images_per_second"] > 0 and 0.0 <= epoch["val_mean_iu"] <= 1.0
    first_cuda, first_cpu = cuda.history[0]["train_loss"], cpu.history[0]["train_loss"]
    assert abs(first_cuda - first_cpu) <= 0.02 * first_cpu, (first_cuda, first_cpu)

    trained = load_model(cuda.model_path)
    assert trained.score_fr.weight.abs().sum() > 0  # zero-initialised, so it trained
    # The staged path on CUDA too: FCN-16s from the CUDA-trained FCN-32s.
    params = cuda_params(tiny_data, tmp_path / "cuda", "cuda")
    fcn16s = train_variant(params, "fcn16s", 1, log=lambda _: None)
    assert torch.isfinite(torch.tensor(fcn16s.history[-1]["train_loss"]))


def test_evaluation_on_cuda_matches_the_cpu_confusion_matrix(tiny_data):
    """The same weights evaluated on CUDA (bf16) and on the CPU (fp32)."""
    dataset = SegmentationDataset(tiny_data / "ingested", "val")
    model = random_scoring_net("fcn8s", "frozen", seed=3).eval()
    with torch.no_grad():
        # Centre each class's scores over the split, so that every class wins somewhere
        # (a random net otherwise predicts one class everywhere and the test says little).
        # A constant added to pool3's scores reaches the output unchanged.
        images = torch.stack([dataset[i].image for i in range(len(dataset))])
        model.score_pool3.bias -= model(images).mean(dim=(0, 2, 3))
    hists = {}
    for name in ("cpu", "cuda"):
        device = torch.device(name)
        model.to(device, memory_format=torch.channels_last)
        loader = eval_loader(dataset, 2, pin_memory=name == "cuda")
        hists[name] = predict_batches(model, loader, dataset.num_classes, device)[0]
    cpu, cuda = hists["cpu"], hists["cuda"]
    assert cuda.device.type == "cpu" and cuda.dtype == torch.int64
    # The same labelled pixels on both (ignore label and padding handled alike).
    assert torch.equal(cpu.sum(dim=1), cuda.sum(dim=1))
    assert (cpu.sum(dim=0) > 0).sum() > 1  # a net that predicts several classes
    disagreement = (cpu - cuda).abs().sum().item() / 2 / cpu.sum().item()
    assert disagreement <= EVAL_MAX_DISAGREEMENT
    iu_cpu = segmentation_scores(cpu)["mean_iu"]
    iu_cuda = segmentation_scores(cuda)["mean_iu"]
    assert abs(iu_cpu - iu_cuda) <= 2 * EVAL_MAX_DISAGREEMENT


def ddp_step_matches_plain_step(device: torch.device) -> None:
    """A world of one process on ``device`` (NCCL on CUDA, gloo on the CPU): an exact
    integer all-reduce, and one DistributedDataParallel training step whose gradients
    equal those of the same net unwrapped (a world of one averages over one rank)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    port = free_port()
    backend = distributed.backend_for(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        assert dist.get_backend() == backend
        hist = torch.arange(36, dtype=torch.int64, device=device).reshape(6, 6) * 2**33
        summed = hist.clone()
        dist.all_reduce(summed)
        assert torch.equal(summed, hist)  # int64 beyond 2**32, exactly
        model = random_scoring_net("fcn8s", "learned").to(device, memory_format=torch.channels_last)
        wrapped = DistributedDataParallel(
            model, device_ids=[device.index or 0] if device.type == "cuda" else None
        )
        generator = torch.Generator().manual_seed(4)
        images = torch.randn(2, 3, 64, 96, generator=generator).to(device)
        images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, NUM_CLASSES, (2, 64, 96), generator=generator).to(device)
        _, loss_plain, grads_plain = forward_backward(model, images, labels, bf16=True)
        _, loss_ddp, grads_ddp = forward_backward(wrapped, images, labels, bf16=True)
        assert loss_ddp.item() == pytest.approx(loss_plain.item(), rel=1e-6)
        assert {n.removeprefix("module.") for n in grads_ddp} == grads_plain.keys()
        for name, grad in grads_ddp.items():
            reference = grads_plain[name.removeprefix("module.")]
            assert torch.allclose(grad.float(), reference.float(), rtol=1e-3, atol=1e-6), name
    finally:
        dist.destroy_process_group()


def test_nccl_process_group_and_ddp_step_on_one_gpu():
    ddp_step_matches_plain_step(torch.device("cuda", 0))
