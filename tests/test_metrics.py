"""Specification of fcn_pipeline.metrics: the confusion histogram and FCN's four scores."""

import math

import numpy as np
import pytest
import torch

from fcn_pipeline.metrics import confusion_matrix, segmentation_scores

IGNORE = 255

# A worked example with K = 4 classes, computed on paper.
#   class 0: 6 ground-truth pixels, predicted 0,0,0,0,1,2
#   class 1: 2 ground-truth pixels, predicted 0,1
#   class 2: absent from the ground truth, predicted once  -> IU 0
#   class 3: absent from both                              -> NaN everywhere
#   2 ignored pixels, predicted 3 (must not show up in column 3)
WORKED_TARGET = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, IGNORE, IGNORE]])
WORKED_PRED = torch.tensor([[0, 0, 0, 0, 1, 2, 0, 1, 3, 3]])
WORKED_HIST = [
    # predicted: 0  1  2  3        t_i
    [4, 1, 1, 0],  # true 0      6
    [1, 1, 0, 0],  # true 1      2
    [0, 0, 0, 0],  # true 2      0
    [0, 0, 0, 0],  # true 3      0
]
# column sums (predicted pixels): 5, 2, 1, 0; total t = 8; diagonal n_ii = 4, 1, 0, 0
# acc_i = n_ii / t_i:                    4/6, 1/2, nan (t=0), nan (t=0)
# IU_i = n_ii / (t_i + col_i - n_ii):    4/(6+5-4) = 4/7, 1/(2+2-1) = 1/3, 0/(0+1-0) = 0, 0/0 = nan
# pixel acc = (4 + 1) / 8                                  = 5/8
# mean acc  = (4/6 + 1/2) / 2        (classes 2, 3 left out) = 7/12
# mean IU   = (4/7 + 1/3 + 0) / 3    (class 3 left out)      = 19/63
# f.w. IU   = (6 * 4/7 + 2 * 1/3) / 8                        = 43/84


def test_confusion_matrix_of_worked_example_drops_ignored_pixels() -> None:
    hist = confusion_matrix(WORKED_PRED, WORKED_TARGET, num_classes=4)
    assert hist.dtype == torch.int64
    assert hist.tolist() == WORKED_HIST


def test_scores_of_worked_example() -> None:
    scores = segmentation_scores(torch.tensor(WORKED_HIST))

    assert scores["pixel_acc"] == pytest.approx(5 / 8)
    assert scores["mean_acc"] == pytest.approx(7 / 12)
    assert scores["mean_iu"] == pytest.approx(19 / 63)
    assert scores["fw_iu"] == pytest.approx(43 / 84)
    assert scores["per_class_acc"][:2] == pytest.approx([4 / 6, 1 / 2])
    assert all(math.isnan(a) for a in scores["per_class_acc"][2:])
    assert scores["per_class_iu"][:3] == pytest.approx([4 / 7, 1 / 3, 0.0])
    assert math.isnan(scores["per_class_iu"][3])
    for name in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"):
        assert type(scores[name]) is float
    assert all(type(v) is float for v in scores["per_class_iu"] + scores["per_class_acc"])


def test_scores_of_perfect_prediction_are_one() -> None:
    scores = segmentation_scores(torch.diag(torch.tensor([3, 5, 0])))
    for name in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"):
        assert scores[name] == pytest.approx(1.0)
    assert math.isnan(scores["per_class_iu"][2])


def test_scores_of_empty_histogram_are_nan() -> None:
    scores = segmentation_scores(torch.zeros(3, 3, dtype=torch.int64))
    for name in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"):
        assert math.isnan(scores[name])
    assert all(math.isnan(v) for v in scores["per_class_iu"] + scores["per_class_acc"])


def test_scores_are_computed_in_float64() -> None:
    # 2**24 + 1 is not representable in float32, so a float32 path would give exactly 1.0.
    big = 2**24
    hist = torch.tensor([[big, 1], [0, 0]])
    assert segmentation_scores(hist)["pixel_acc"] == big / (big + 1)


def test_scores_reject_non_square_histogram() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        segmentation_scores(torch.zeros(2, 3))


def _random_labels(generator: torch.Generator, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.randint(0, k, (2, 7, 9), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.2] = IGNORE
    pred = torch.randint(0, k, (2, 7, 9), generator=generator)
    return pred, target


def test_confusion_matrix_equals_naive_pixel_loop() -> None:
    k = 5
    pred, target = _random_labels(torch.Generator().manual_seed(0), k)

    expected = [[0] * k for _ in range(k)]
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist(), strict=True):
        if t != IGNORE:
            expected[t][p] += 1

    assert confusion_matrix(pred, target, num_classes=k).tolist() == expected


def test_confusion_matrix_equals_count_of_each_class_pair() -> None:
    k = 4
    pred, target = _random_labels(torch.Generator().manual_seed(1), k)
    expected = torch.tensor(
        [[int(((target == i) & (pred == j)).sum()) for j in range(k)] for i in range(k)]
    )
    hist = confusion_matrix(pred, target, num_classes=k)
    assert torch.equal(hist, expected)
    assert int(hist.sum()) == int((target != IGNORE).sum())


def test_confusion_matrix_accepts_uint8_labels_and_validate_false() -> None:
    # uint8 would overflow target * K if the arithmetic were not done in int64.
    target = WORKED_TARGET.to(torch.uint8)
    pred = WORKED_PRED.to(torch.uint8)
    hist = confusion_matrix(pred, target, num_classes=4, validate=False)
    assert hist.tolist() == WORKED_HIST


def test_confusion_matrix_with_custom_ignore_index() -> None:
    target = torch.tensor([0, -1, 1])
    pred = torch.tensor([0, 1, 1])
    assert confusion_matrix(pred, target, 2, ignore_index=-1).tolist() == [[1, 0], [0, 1]]


def test_histograms_of_batches_add_up() -> None:
    pred, target = _random_labels(torch.Generator().manual_seed(2), 3)
    whole = confusion_matrix(pred, target, 3)
    parts = confusion_matrix(pred[:1], target[:1], 3) + confusion_matrix(pred[1:], target[1:], 3)
    assert torch.equal(whole, parts)


def test_confusion_matrix_rejects_shape_mismatch_naming_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        confusion_matrix(
            torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), 2
        )


@pytest.mark.parametrize(
    ("pred", "target", "value"),
    [
        ([0, 1], [0, 7], "7"),  # target >= K and not ignore_index
        ([0, 1], [-2, 1], "-2"),  # negative target
        ([0, 4], [0, 1], "4"),  # pred >= K
        ([-1, 1], [0, 1], "-1"),  # negative pred
    ],
)
def test_confusion_matrix_rejects_out_of_range_values(
    pred: list[int], target: list[int], value: str
) -> None:
    with pytest.raises(ValueError, match=rf"value {value} "):
        confusion_matrix(torch.tensor(pred), torch.tensor(target), num_classes=4)


def test_confusion_matrix_ignores_pred_at_ignored_pixels() -> None:
    # Only counted pixels are checked: what the model says at an unlabelled pixel is irrelevant.
    hist = confusion_matrix(torch.tensor([1, 9]), torch.tensor([1, IGNORE]), num_classes=2)
    assert hist.tolist() == [[0, 0], [0, 1]]


def test_confusion_matrix_rejects_float_inputs() -> None:
    with pytest.raises(TypeError, match="float32"):
        confusion_matrix(torch.zeros(3), torch.zeros(3, dtype=torch.long), 2)


def test_scores_accept_the_reference_numpy_histogram_and_name_other_types():
    hist = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 4]], dtype=np.int64)
    from_numpy = segmentation_scores(hist)
    from_tensor = segmentation_scores(torch.from_numpy(hist))
    assert from_numpy == from_tensor
    assert from_numpy["pixel_acc"] == pytest.approx(16 / 20)
    with pytest.raises(TypeError, match=r"torch\.Tensor or numpy\.ndarray, got list"):
        segmentation_scores(hist.tolist())
