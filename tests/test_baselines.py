"""The synthetic default is not a colour-lookup toy."""

from __future__ import annotations

from fcn_pipeline.baselines import colour_classifier_scores
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
