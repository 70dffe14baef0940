"""Specification of fcn_pipeline.losses: weighted, sampled cross-entropy and the sampling mask."""

import math

import pytest
import torch
import torch.nn.functional as F

from fcn_pipeline.losses import loss_sampling_mask, segmentation_loss

IGNORE = 255

# Two classes, one image of 1 x 4 pixels. Logits (class 0, class 1) and targets:
#   pixel a: ( 2,  0), target 0   ce = -log(e^2 / (e^2 + e^0))  = log(1 + e^-2)
#   pixel b: ( 0,  1), target 1   ce = -log(e^1 / (e^0 + e^1))  = log(1 + e^-1)
#   pixel c: ( 1, -1), target 1   ce = -log(e^-1 / (e^1 + e^-1)) = log(1 + e^2)
#   pixel d: ( 5, -5), ignored
LOGITS = torch.tensor([[[[2.0, 0.0, 1.0, 5.0]], [[0.0, 1.0, -1.0, -5.0]]]])  # (1, 2, 1, 4)
TARGET = torch.tensor([[[0, 1, 1, IGNORE]]])  # (1, 1, 4)
CE_A = math.log(1 + math.exp(-2))
CE_B = math.log(1 + math.exp(-1))
CE_C = math.log(1 + math.exp(2))
WEIGHTS = torch.tensor([1.0, 3.0])


def test_unweighted_loss_is_mean_over_labelled_pixels() -> None:
    loss = segmentation_loss(LOGITS, TARGET)
    assert loss.item() == pytest.approx((CE_A + CE_B + CE_C) / 3, rel=1e-6)


def test_weighted_loss_divides_by_pixel_count_not_weight_sum() -> None:
    loss = segmentation_loss(LOGITS, TARGET, class_weights=WEIGHTS)
    # w = (1, 3): a is class 0, b and c are class 1; 3 labelled pixels.
    assert loss.item() == pytest.approx((1 * CE_A + 3 * CE_B + 3 * CE_C) / 3, rel=1e-6)
    # PyTorch's weighted mean divides by the weight sum 1 + 3 + 3 = 7 instead.
    torch_mean = F.cross_entropy(LOGITS, TARGET, weight=WEIGHTS, ignore_index=IGNORE)
    assert torch_mean.item() == pytest.approx((1 * CE_A + 3 * CE_B + 3 * CE_C) / 7, rel=1e-6)


def test_ignored_pixels_contribute_nothing() -> None:
    wild = LOGITS.clone()
    wild[0, :, 0, 3] = torch.tensor([-100.0, 100.0])  # the ignored pixel d
    assert torch.equal(segmentation_loss(wild, TARGET), segmentation_loss(LOGITS, TARGET))

    logits = LOGITS.clone().requires_grad_()
    segmentation_loss(logits, TARGET, class_weights=WEIGHTS).backward()
    assert torch.all(logits.grad[0, :, 0, 3] == 0)
    assert torch.all(logits.grad[0, :, 0, :3] != 0)


def test_keep_mask_excludes_pixels_and_normalises_by_kept_count() -> None:
    keep = torch.tensor([[[True, False, True, True]]])  # drops b; d stays ignored
    loss = segmentation_loss(LOGITS, TARGET, class_weights=WEIGHTS, keep_mask=keep)
    # Kept and labelled: a and c, so divide by 2.
    assert loss.item() == pytest.approx((1 * CE_A + 3 * CE_C) / 2, rel=1e-6)

    logits = LOGITS.clone().requires_grad_()
    segmentation_loss(logits, TARGET, keep_mask=keep).backward()
    assert torch.all(logits.grad[0, :, 0, 1] == 0)


@pytest.mark.parametrize(
    ("target", "keep"),
    [
        (torch.full((1, 1, 4), IGNORE), None),  # every pixel ignored
        (TARGET, torch.zeros(1, 1, 4, dtype=torch.bool)),  # every pixel sampled out
    ],
)
def test_nothing_counted_gives_zero_with_working_backward(
    target: torch.Tensor, keep: torch.Tensor | None
) -> None:
    logits = LOGITS.clone().requires_grad_()
    loss = segmentation_loss(logits, target, keep_mask=keep)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_loss_is_float32_under_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=generator)
    target = torch.randint(0, 3, (2, 5, 6), generator=generator)
    expected = segmentation_loss(logits, target)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = segmentation_loss(logits.bfloat16(), target)
    assert loss.dtype == torch.float32
    # Only the bfloat16 rounding of the inputs differs.
    assert loss.item() == pytest.approx(expected.item(), rel=1e-2)


def test_loss_never_reads_values_back_to_the_host() -> None:
    # Meta tensors have no data: any .item(), bool() or data-dependent shape would raise.
    logits = torch.empty(2, 3, 4, 5, device="meta")
    target = torch.empty(2, 4, 5, dtype=torch.long, device="meta")
    keep = torch.empty(2, 4, 5, dtype=torch.bool, device="meta")
    weights = torch.empty(3, device="meta")
    loss = segmentation_loss(logits, target, class_weights=weights, keep_mask=keep)
    assert loss.shape == ()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target": torch.zeros(1, 1, 3, dtype=torch.long)},  # spatial size mismatch
        {"target": torch.zeros(1, 1, 4, dtype=torch.int32)},  # not int64
        {"class_weights": torch.ones(3)},  # K mismatch
        {"keep_mask": torch.ones(1, 1, 4)},  # not bool
    ],
)
def test_loss_rejects_inconsistent_inputs(kwargs: dict[str, torch.Tensor]) -> None:
    arguments = {"logits": LOGITS, "target": TARGET} | kwargs
    logits, target = arguments.pop("logits"), arguments.pop("target")
    with pytest.raises(ValueError):
        segmentation_loss(logits, target, **arguments)


def test_sampling_keeps_about_p_of_the_cells() -> None:
    p, cell, draws = 0.3, 4, 8
    generator = torch.Generator().manual_seed(0)
    kept = 0
    for _ in range(draws):
        mask = loss_sampling_mask((4, 100, 100), cell, p, generator=generator)
        kept += int(mask[:, ::cell, ::cell].sum())  # one pixel per cell: its top-left
    cells = draws * 4 * 25 * 25  # 20,000 cells
    # Binomial: sd of the kept fraction is sqrt(p (1 - p) / cells) ~ 0.0032; allow 5 sd.
    tolerance = 5 * math.sqrt(p * (1 - p) / cells)
    assert abs(kept / cells - p) < tolerance


def test_sampling_is_constant_within_each_cell_including_partial_border_cells() -> None:
    # H = 10, W = 7 with cell 4: a 3 x 2 grid whose last row is 2 pixels high and
    # last column 3 pixels wide.
    n, h, w, cell = 3, 10, 7, 4
    mask = loss_sampling_mask((n, h, w), cell, 0.5, generator=torch.Generator().manual_seed(1))
    assert mask.shape == (n, h, w)
    assert mask.dtype == torch.bool
    coarse = mask[:, ::cell, ::cell]
    assert coarse.shape == (n, 3, 2)
    for i in range(n):
        for y in range(h):
            for x in range(w):
                assert mask[i, y, x] == coarse[i, y // cell, x // cell]


def test_partial_border_cells_are_kept_about_p() -> None:
    p = 0.5
    generator = torch.Generator().manual_seed(2)
    # H = W = 33 with cell 32: the last row and column of cells are 1 pixel wide.
    border = torch.stack(
        [loss_sampling_mask((50, 33, 33), 32, p, generator=generator)[:, 32, 32] for _ in range(40)]
    )
    cells = border.numel()  # 2,000 one-pixel corner cells
    assert abs(border.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / cells)


def test_sampling_differs_between_images_and_between_calls() -> None:
    generator = torch.Generator().manual_seed(3)
    first = loss_sampling_mask((2, 64, 64), 4, 0.5, generator=generator)
    second = loss_sampling_mask((2, 64, 64), 4, 0.5, generator=generator)
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first, second)


def test_sampling_with_p_one_keeps_everything_without_drawing() -> None:
    generator = torch.Generator().manual_seed(4)
    state = generator.get_state()
    mask = loss_sampling_mask((2, 9, 11), 32, 1.0, generator=generator)
    assert mask.dtype == torch.bool
    assert mask.shape == (2, 9, 11)
    assert bool(mask.all())
    assert torch.equal(generator.get_state(), state)


def test_sampling_with_the_same_seed_is_identical() -> None:
    masks = [
        loss_sampling_mask((2, 40, 50), 8, 0.3, generator=torch.Generator().manual_seed(5))
        for _ in range(2)
    ]
    assert torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5, math.nan])
def test_sampling_rejects_p_outside_zero_one(p: float) -> None:
    with pytest.raises(ValueError, match="p="):
        loss_sampling_mask((1, 8, 8), 4, p)


@pytest.mark.parametrize("cell_size", [0, -1])
def test_sampling_rejects_cell_size_below_one(cell_size: int) -> None:
    with pytest.raises(ValueError, match="cell_size"):
        loss_sampling_mask((1, 8, 8), cell_size, 0.5)


def test_sampled_mask_plugs_into_the_loss() -> None:
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, 16, 16, generator=generator)
    target = torch.randint(0, 3, (2, 16, 16), generator=generator)
    keep = loss_sampling_mask(target.shape, 8, 0.5, generator=generator)
    assert 0 < keep.sum() < keep.numel()
    per_pixel = F.cross_entropy(logits, target, reduction="none")
    expected = per_pixel[keep].mean()
    assert torch.allclose(segmentation_loss(logits, target, keep_mask=keep), expected)
    assert not torch.allclose(segmentation_loss(logits, target), expected)


def test_the_criterion_applies_its_class_weights_and_its_sampled_cells() -> None:
    """What training calls: the weights and the loss-sampling mask must reach the loss
    (question 2 rests on both). Recomputed here from the same generator's draws."""
    from fcn_pipeline.losses import SegmentationCriterion

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, generator=generator)
    target = torch.randint(0, 3, (2, 16, 16), generator=generator)
    weights = torch.tensor([0.2, 1.0, 5.0])
    criterion = SegmentationCriterion(class_weights=weights, loss_sampling=0.5, cell_size=4)
    criterion.reseed(7)
    loss = criterion(logits, target)
    keep = loss_sampling_mask(target.shape, 4, 0.5, generator=torch.Generator().manual_seed(7))
    assert 0 < keep.sum() < keep.numel()
    expected = segmentation_loss(logits, target, class_weights=weights, keep_mask=keep)
    assert torch.equal(loss, expected)
    # Neither the weights nor the mask is a no-op on this batch.
    assert not torch.isclose(loss, segmentation_loss(logits, target, keep_mask=keep))
    assert not torch.isclose(loss, segmentation_loss(logits, target, class_weights=weights))
    # Reseeding replays the same masks; the next call draws new ones.
    criterion.reseed(7)
    assert torch.equal(criterion(logits, target), loss)
    assert not torch.equal(criterion(logits, target), loss)
