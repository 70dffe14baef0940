"""The synthetic default is not a colour-lookup toy."""

from __future__ import annotations

import pytest
import torch

from fcn_pipeline.baselines import (
    colour_classifier_scores,
    fitted_prediction,
    stride_ceiling_scores,
)
from fcn_pipeline.config import DataParams, SyntheticParams
from fcn_pipeline.ingest import ingest


def test_colour_classifier_stays_far_below_the_bar(tmp_path):
    splits = {"train": 30, "val": 1, "test": 12}
    data = DataParams(synthetic=SyntheticParams(splits=splits), workers=1)
    dataset = ingest(data, tmp_path / "ingested").out
    scores = colour_classifier_scores(dataset, max_train_pixels=50_000)
    assert scores["mean_iu"] < 0.35
    # What colour alone can do is call everything background.
    assert scores["pixel_acc"] > 0.5
    assert max(scores["per_class_iu"][1:]) < 0.2


def test_fitted_scores_at_stride_one_reproduce_the_labels():
    masks = torch.randint(0, 4, (2, 9, 13))
    masks[0, 0, :5] = 255  # ignored pixels take any label
    prediction = fitted_prediction(masks, 4, 1, steps=100)
    keep = masks != 255
    assert torch.equal(prediction[keep], masks[keep])


def test_a_coarse_stride_cannot_draw_a_one_pixel_line():
    masks = torch.zeros((1, 32, 32), dtype=torch.int64)
    masks[0, :, 13] = 1  # a 1-pixel vertical line
    fine = fitted_prediction(masks, 2, 2, steps=200)
    coarse = fitted_prediction(masks, 2, 8, steps=200)
    line_fine = (fine[0] == 1) & (masks[0] == 1)
    line_coarse = (coarse[0] == 1) & (masks[0] == 1)
    assert line_fine.sum() == 32
    # At stride 8 the line costs less to miss than to paint 8 pixels wide.
    assert line_coarse.sum() < 32


@pytest.mark.slow  # 150 optimisation steps: 2 s
def test_stride_ceiling_falls_with_the_stride(tmp_path):
    splits = {"train": 1, "val": 1, "test": 6}
    data = DataParams(synthetic=SyntheticParams(splits=splits), workers=1)
    dataset = ingest(data, tmp_path / "ingested").out
    scores = stride_ceiling_scores(dataset, "test", (4, 8, 32), steps=150)
    ious = [scores[stride]["mean_iu"] for stride in (4, 8, 32)]
    assert ious[0] > ious[1] > ious[2]
    assert ious[0] > 0.85
