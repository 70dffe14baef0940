"""Evaluation: metrics at native resolution, confusion plot data, overlays, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fcn_pipeline.checkpoints import MODEL_FILE, load_model, model_record, save_file
from fcn_pipeline.config import EvaluateParams, TrainParams
from fcn_pipeline.data import SegmentationDataset
from fcn_pipeline.errors import CheckpointError, ConfigError
from fcn_pipeline.evaluation import (
    evaluate_variant,
    overlay_indices,
    predict_and_count,
    row_normalized,
)
from fcn_pipeline.metrics import confusion_matrix, segmentation_scores
from fcn_pipeline.models import build_fcn
from fcn_pipeline.training import train_variant
from tests.conftest import perturb_weights, predicted_classes

CLASSES = ["background", "bus", "disc", "triangle", "checker", "pole"]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """A models directory with a briefly trained FCN-32s."""
    out = tmp_path_factory.mktemp("models")
    params = TrainParams(
        data=str(tiny_data / "ingested"),
        patches=str(tiny_data / "patches"),
        stats=str(tiny_data / "stats"),
        out=str(out),
        width=0.03125,
        batch_size=2,
        device="cpu",
        workers=0,
        lr=3e-3,
    )
    train_variant(params, "fcn32s", 2)
    return out


def eval_params(tiny_data: Path, models: Path, tmp_path: Path, **changes) -> EvaluateParams:
    settings = {
        "data": str(tiny_data / "ingested"),
        "models": str(models),
        "metrics": str(tmp_path / "metrics"),
        "out": str(tmp_path / "evaluation"),
        "overlays": 3,
        "batch_size": 3,
        "device": "cpu",
        "workers": 0,
        **changes,
    }
    return EvaluateParams(**settings)


def test_metrics_equal_a_per_image_computation_at_native_size(tiny_data, trained, tmp_path):
    result = evaluate_variant(eval_params(tiny_data, trained, tmp_path), "fcn32s")
    model = load_model(trained / "fcn32s" / MODEL_FILE).eval()
    dataset = SegmentationDataset(tiny_data / "ingested", "test")
    hist = torch.zeros((6, 6), dtype=torch.int64)
    dominated = []  # per image: share of the labelled pixels of its largest non-background class
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            pred = model(sample.image[None]).argmax(1)[0]
            assert pred.shape == sample.mask.shape  # native resolution
            hist += confusion_matrix(pred, sample.mask, 6)
            counts = torch.bincount(sample.mask[sample.mask != 255], minlength=6)
            dominated.append(float(counts[1:].max() / counts.sum()))
    expected = segmentation_scores(hist)
    written = json.loads(result.metrics_path.read_text())
    labelled = sum(int((dataset[i].mask != 255).sum()) for i in range(len(dataset)))
    assert written["pixels"] == int(hist.sum()) == labelled
    for key in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"):
        assert written[key] == pytest.approx(expected[key], abs=1e-12), key
    for name, value in zip(CLASSES, expected["per_class_iu"], strict=True):
        stored = written["per_class_iu"][name]
        assert (stored is None and np.isnan(value)) or stored == pytest.approx(value)
    assert written["split"] == "test" and written["images"] == 4
    large = written["large_object"]
    assert large["share"] == 0.5
    assert large["images"] == sum(share >= 0.5 for share in dominated)
    assert large["images"] == 0 or 0.0 <= large["dominant_class_iu"] <= 1.0


def test_confusion_csv_has_one_row_per_cell_normalised_per_actual_class(
    tiny_data, trained, tmp_path
):
    result = evaluate_variant(eval_params(tiny_data, trained, tmp_path), "fcn32s")
    with open(result.out / "confusion.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 * 6
    assert [(r["actual"], r["predicted"]) for r in rows[:6]] == [("background", c) for c in CLASSES]
    total_pixels = sum(int(r["pixels"]) for r in rows)
    assert total_pixels == json.loads(result.metrics_path.read_text())["pixels"]
    for actual in CLASSES:
        shares = [float(r["share"]) for r in rows if r["actual"] == actual]
        pixels = sum(int(r["pixels"]) for r in rows if r["actual"] == actual)
        assert sum(shares) == pytest.approx(1.0 if pixels else 0.0, abs=1e-5)
    assert (result.out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overlays_are_the_same_images_every_time(tiny_data, trained, tmp_path):
    first = evaluate_variant(eval_params(tiny_data, trained, tmp_path / "a"), "fcn32s")
    second = evaluate_variant(eval_params(tiny_data, trained, tmp_path / "b"), "fcn32s")
    names = sorted(p.name for p in (first.out / "overlays").iterdir())
    assert names == ["00-test-00000.png", "01-test-00002.png", "02-test-00003.png"]
    for name in names:
        a = (first.out / "overlays" / name).read_bytes()
        assert a == (second.out / "overlays" / name).read_bytes()
    assert overlay_indices(3, 4) == [0, 2, 3]
    assert overlay_indices(10, 4) == [0, 1, 2, 3]
    assert overlay_indices(0, 4) == []


def test_batched_prediction_equals_one_image_at_a_time(tiny_data, trained):
    model = load_model(trained / "fcn32s" / MODEL_FILE)
    dataset = SegmentationDataset(tiny_data / "ingested", "val")
    device = torch.device("cpu")
    one, kept_one = predict_and_count(model, dataset, batch_size=1, device=device, keep={1})
    many, kept_many = predict_and_count(model, dataset, batch_size=4, device=device, keep={1})
    assert torch.equal(one, many)
    assert np.array_equal(kept_one[1], kept_many[1])


def test_row_normalized_leaves_empty_rows_at_zero():
    hist = torch.tensor([[3, 1], [0, 0]])
    assert np.allclose(row_normalized(hist), [[0.75, 0.25], [0.0, 0.0]])


def test_class_count_mismatch_is_a_clear_error_and_writes_nothing(tiny_data, tmp_path):
    models = tmp_path / "models"
    model = build_fcn("fcn32s", 3, width=0.03125)
    save_file(models / "fcn32s" / MODEL_FILE, model_record(model, ["a", "b", "c"]))
    params = eval_params(tiny_data, models, tmp_path)
    with pytest.raises(CheckpointError, match="3 classes"):
        evaluate_variant(params, "fcn32s")
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "evaluation").exists()


def test_corrupt_model_keeps_the_previous_outputs(tiny_data, trained, tmp_path):
    params = eval_params(tiny_data, trained, tmp_path)
    good = evaluate_variant(params, "fcn32s")
    before = good.metrics_path.read_bytes()
    broken = tmp_path / "broken"
    (broken / "fcn32s").mkdir(parents=True)
    (broken / "fcn32s" / MODEL_FILE).write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match=r"model\.pt: corrupt"):
        evaluate_variant(eval_params(tiny_data, broken, tmp_path), "fcn32s")
    assert good.metrics_path.read_bytes() == before
    assert (good.out / "confusion.csv").is_file()


def test_unknown_variant_and_missing_model(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="unknown variant 'fcn4s'"):
        evaluate_variant(eval_params(tiny_data, tmp_path, tmp_path), "fcn4s")
    with pytest.raises(CheckpointError, match=r"fcn8s/model\.pt: not found"):
        evaluate_variant(eval_params(tiny_data, tmp_path, tmp_path), "fcn8s")


def test_void_pixels_count_nowhere_in_the_metrics(tmp_path):
    """On a dataset whose masks hold void (255) pixels, evaluate's metrics equal a
    computation by hand over the labelled pixels only, for a net whose predictions vary."""
    from fcn_pipeline.config import DataParams
    from fcn_pipeline.ingest import ingest
    from tests.test_ingest import make_folder

    stems = [f"img{i}" for i in range(8)]
    masks = make_folder(
        tmp_path / "folder",
        n=8,
        size=(20, 24),
        splits={"train": stems[:4], "val": stems[4:5], "test": stems[5:]},
    )
    rng = np.random.default_rng(3)
    for stem, mask in masks.items():  # a void band and scattered void pixels per image
        mask[5:8, :] = 255
        mask[rng.random(mask.shape) < 0.1] = 255
        from PIL import Image

        Image.fromarray(mask).save(tmp_path / "folder" / "masks" / f"{stem}.png")
    data = tmp_path / "ingested"
    ingest(DataParams(format="folder", root=str(tmp_path / "folder"), workers=1), data)
    test_set = SegmentationDataset(data, "test")
    names = test_set.meta.class_names
    torch.manual_seed(0)
    model = perturb_weights(build_fcn("fcn32s", len(names), width=0.03125).eval(), 0.2)
    save_file(tmp_path / "models" / "fcn32s" / MODEL_FILE, model_record(model, names))
    result = evaluate_variant(
        eval_params(data.parent, tmp_path / "models", tmp_path, data=str(data)),
        "fcn32s",
        log=lambda _: None,
    )
    hist = torch.zeros((len(names), len(names)), dtype=torch.int64)
    void = 0
    for i in range(len(test_set)):
        sample = test_set[i]
        with torch.no_grad():
            pred = model(sample.image[None]).argmax(1)[0]
        hist += confusion_matrix(pred, sample.mask, len(names))
        void += int((sample.mask == 255).sum())
    assert void > 0 and predicted_classes(hist) >= 2
    assert result.metrics["pixels"] == int(hist.sum()) == len(test_set) * 20 * 24 - void
    assert result.metrics["mean_iu"] == pytest.approx(segmentation_scores(hist)["mean_iu"])
    assert result.metrics["pixel_acc"] == pytest.approx(segmentation_scores(hist)["pixel_acc"])
