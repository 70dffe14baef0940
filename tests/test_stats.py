"""The stats stage: exact class counts, class weights, outputs and failures."""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcn_pipeline.class_weights import SCHEMES, read_stats, scheme_weights
from fcn_pipeline.class_weights import load_class_weights as load_weights
from fcn_pipeline.config import DataParams, StatsParams, SyntheticParams, parse_params
from fcn_pipeline.errors import ConfigError, DatasetError
from fcn_pipeline.ingest import ingest
from fcn_pipeline.stats import AbsentClassWarning, count_classes
from fcn_pipeline.store import (
    IGNORE_INDEX,
    META_FILE,
    DatasetMeta,
    ShardInfo,
    count_labels,
    decode_mask,
    encode_png,
    iter_shard,
    shard_paths,
    write_shard,
)
from flows.cli import main
from tests.conftest import compute_stats

REPO = Path(__file__).resolve().parents[1]
SMALL_SYNTHETIC = SyntheticParams(height=64, width=64, splits={"train": 12, "val": 2, "test": 2})


def write_dataset(
    root: Path, class_names: list[str], splits: dict[str, list[np.ndarray]], shard_size: int
) -> Path:
    """An ingested dataset made of the given masks (images are black)."""
    shards: dict[str, list[ShardInfo]] = {}
    for split, masks in splits.items():
        for number, start in enumerate(range(0, len(masks), shard_size)):
            rows = [
                {
                    "id": f"{split}-{start + i}",
                    "split": split,
                    "height": mask.shape[0],
                    "width": mask.shape[1],
                    "image": encode_png(np.zeros((*mask.shape, 3), dtype=np.uint8)),
                    "mask": encode_png(mask.astype(np.uint8)),
                }
                for i, mask in enumerate(masks[start : start + shard_size])
            ]
            relpath = f"{split}/shard-{number:05d}.parquet"
            write_shard(root / relpath, rows)
            shards.setdefault(split, []).append(ShardInfo(relpath, len(rows)))
    colors = [[i, i, i] for i in range(len(class_names))]
    meta = DatasetMeta({"format": "test"}, class_names, colors, IGNORE_INDEX, shards)
    (root / META_FILE).write_text(json.dumps(meta.to_json()))
    return root


# Three train images over classes a, b, c, d (d never appears), 4 ignore pixels.
HAND_TRAIN = [
    np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [255, 255, 255, 255]]),
    np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [2, 2, 2, 2]]),
    np.array([[1, 1, 1, 1], [1, 1, 1, 1]]),
]
HAND_VAL = [np.array([[3, 3], [0, 255]])]


@pytest.fixture
def hand_dataset(tmp_path: Path) -> Path:
    return write_dataset(
        tmp_path / "hand", ["a", "b", "c", "d"], {"train": HAND_TRAIN, "val": HAND_VAL}, 2
    )


@pytest.fixture(scope="module")
def small_ingested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stats") / "ingested"
    ingest(DataParams(synthetic=SMALL_SYNTHETIC, shard_size=5, workers=1), out)
    return out


# --- counting -------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((0, 5), dtype=np.uint8),
        np.full((7, 9), 255, dtype=np.uint8),
        np.random.default_rng(0).integers(0, 256, (31, 17), dtype=np.uint8),  # short runs
        np.kron(np.random.default_rng(1).integers(0, 4, (6, 8)), np.ones((9, 9))).astype(np.uint8),
    ],
    ids=["empty", "all-ignore", "noise", "blocks"],
)
def test_count_labels_is_an_exact_histogram(mask: np.ndarray) -> None:
    counts = count_labels(mask)
    assert counts.dtype == np.int64 and counts.shape == (256,)
    np.testing.assert_array_equal(counts, np.bincount(mask.ravel(), minlength=256))


def test_counts_of_a_hand_made_dataset(hand_dataset: Path) -> None:
    train = count_classes(hand_dataset, workers=1).splits["train"]
    assert train.images == 3
    np.testing.assert_array_equal(train.pixels, [20, 12, 4, 0])
    np.testing.assert_array_equal(train.images_with_class, [2, 2, 1, 0])
    # a: images 0 and 1 (12 + 16 labelled), b: images 0 and 2 (12 + 8), c: image 1.
    np.testing.assert_array_equal(train.image_pixels_with_class, [28, 20, 16, 0])
    assert train.ignored_pixels == 4 and train.labelled_pixels == 36


def class_weights(train, scheme: str) -> np.ndarray:
    return scheme_weights(scheme, train.pixels, train.image_pixels_with_class)


def load_class_weights(stats_dir: Path, scheme: str) -> np.ndarray:
    """The weights of ``scheme``, with the class list the stats themselves name."""
    names = json.loads((Path(stats_dir) / "stats.json").read_text())["class_names"]
    return load_weights(stats_dir, scheme, names)[0]


def test_weights_of_a_hand_made_dataset(hand_dataset: Path) -> None:
    train = count_classes(hand_dataset, workers=1).splits["train"]
    # freq = 20/28, 12/20, 4/16; median over present classes = 0.6.
    np.testing.assert_allclose(
        class_weights(train, "median_frequency"), [0.6 * 28 / 20, 1.0, 0.6 * 16 / 4, 0.0]
    )
    # N / (K' n_c) with N = 36 labelled pixels, K' = 3 present classes.
    inverse = class_weights(train, "inverse_frequency")
    np.testing.assert_allclose(inverse, [36 / 60, 36 / 36, 36 / 12, 0.0])
    assert np.dot(train.pixels / 36, inverse) == pytest.approx(1.0)
    expected_enet = [1 / math.log(1.02 + n / 36) for n in (20, 12, 4)] + [0.0]
    np.testing.assert_allclose(class_weights(train, "enet"), expected_enet)
    np.testing.assert_array_equal(class_weights(train, "none"), [1, 1, 1, 1])
    with pytest.raises(ConfigError, match="'bogus'"):
        class_weights(train, "bogus")


def test_counts_do_not_depend_on_sharding_or_workers(hand_dataset: Path, tmp_path: Path) -> None:
    splits = {"train": HAND_TRAIN, "val": HAND_VAL}
    one_per_shard = write_dataset(tmp_path / "one", ["a", "b", "c", "d"], splits, 1)
    reference = count_classes(hand_dataset, workers=1).splits
    counts = count_classes(one_per_shard, workers=2)
    for split, expected in reference.items():
        assert counts.splits[split].to_json() == expected.to_json()


def test_counts_match_an_independent_pass_over_the_masks(small_ingested: Path) -> None:
    counts = count_classes(small_ingested, workers=2)
    k = counts.meta.num_classes
    for split in ("train", "val", "test"):
        pixels, with_class, image_pixels = np.zeros((3, k), dtype=np.int64)
        for path in shard_paths(small_ingested, split):
            for row in iter_shard(path, columns=["mask"]):
                values, n = np.unique(decode_mask(row["mask"]), return_counts=True)
                labelled = n[values != IGNORE_INDEX].sum()
                for value, count in zip(values, n, strict=True):
                    if value != IGNORE_INDEX:
                        pixels[value] += count
                        with_class[value] += 1
                        image_pixels[value] += labelled
        got = counts.splits[split]
        np.testing.assert_array_equal(got.pixels, pixels)
        np.testing.assert_array_equal(got.images_with_class, with_class)
        np.testing.assert_array_equal(got.image_pixels_with_class, image_pixels)


# --- outputs --------------------------------------------------------------------


def test_compute_stats_writes_json_tables_and_plot(small_ingested: Path, tmp_path: Path) -> None:
    out = tmp_path / "stats"
    result = compute_stats(StatsParams(data=str(small_ingested), workers=1), out)
    summary = json.loads((out / "stats.json").read_text())
    names = summary["class_names"]
    assert names == list(SMALL_SYNTHETIC.classes)
    assert set(summary["splits"]) == {"train", "val", "test"}
    assert summary["splits"]["train"]["images"] == 12
    assert set(summary["weights"]) == set(SCHEMES)
    for scheme in SCHEMES:
        assert summary["weights"][scheme] == result.weights[scheme]
        np.testing.assert_array_equal(load_class_weights(out, scheme), result.weights[scheme])
        assert len(summary["weights"][scheme]) == len(names)
    for split in ("train", "val", "test"):
        with open(out / "class_frequency" / f"{split}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [row["class"] for row in rows] == names
        assert {row["split"] for row in rows} == {split}
        assert sum(float(row["share"]) for row in rows) == pytest.approx(1.0, abs=1e-5)
        pixels = [int(row["pixels"]) for row in rows]
        assert pixels == summary["splits"][split]["pixels"]
    with Image.open(out / "class_frequency.png") as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 200


def test_a_class_absent_from_train_gets_weight_zero_and_a_warning(
    hand_dataset: Path, tmp_path
) -> None:
    with pytest.warns(
        AbsentClassWarning, match=r"'d'.* every computed weighting scheme \(1 in 'none'\)"
    ):
        result = compute_stats(StatsParams(data=str(hand_dataset), workers=1), tmp_path / "s")
    assert result.absent_classes == ["d"]
    for scheme in ("median_frequency", "inverse_frequency", "enet"):
        assert result.weights[scheme][3] == 0.0
        assert all(w > 0 for w in result.weights[scheme][:3])
    assert result.weights["none"] == [1.0, 1.0, 1.0, 1.0]
    assert read_stats(tmp_path / "s")["absent_classes"] == ["d"]


# --- CamVid -----------------------------------------------------------------------


@pytest.mark.camvid
def test_camvid_train_counts_and_median_frequency_weights(
    camvid_root: Path, camvid_ingested: Path, tmp_path: Path
) -> None:
    # Independent: the original SegNet masks, void = 11 excluded, plain numpy.
    histograms = []
    for path in sorted((camvid_root / "trainannot").glob("*.png")):
        with Image.open(path) as mask:
            histograms.append(np.bincount(np.asarray(mask).ravel(), minlength=12)[:11])
    per_image = np.array(histograms, dtype=np.int64)
    pixels = per_image.sum(axis=0)
    present = per_image > 0
    image_pixels = (present * per_image.sum(axis=1, keepdims=True)).sum(axis=0)
    freq = pixels / image_pixels
    expected_weights = np.median(freq) / freq

    with warnings.catch_warnings():
        warnings.simplefilter("error", AbsentClassWarning)  # every class is in train
        compute_stats(StatsParams(data=str(camvid_ingested)), tmp_path / "stats")
    train = read_stats(tmp_path / "stats")["splits"]["train"]
    assert train["images"] == len(histograms) == 367
    assert train["pixels"] == pixels.tolist()
    assert train["images_with_class"] == present.sum(axis=0).tolist()
    assert train["image_pixels_with_class"] == image_pixels.tolist()
    np.testing.assert_allclose(
        load_class_weights(tmp_path / "stats", "median_frequency"), expected_weights, rtol=1e-12
    )


# --- bad input ------------------------------------------------------------------


def test_missing_dataset_is_named_and_previous_output_survives(tmp_path: Path) -> None:
    out = tmp_path / "stats"
    out.mkdir()
    (out / "stats.json").write_text("previous")
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=re.escape(str(missing))):
        compute_stats(StatsParams(data=str(missing)), out)
    assert (out / "stats.json").read_text() == "previous"


def test_schema_mismatch_is_named(hand_dataset: Path, tmp_path: Path) -> None:
    meta = json.loads((hand_dataset / META_FILE).read_text())
    meta["schema_version"] = 99
    (hand_dataset / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="schema_version 99"):
        compute_stats(StatsParams(data=str(hand_dataset)), tmp_path / "stats")


def test_mask_values_outside_the_classes_name_the_shard_and_image(tmp_path: Path) -> None:
    bad = [np.zeros((4, 4)), np.full((4, 4), 7)]
    data = write_dataset(tmp_path / "bad", ["a", "b"], {"train": bad}, 8)
    out = tmp_path / "stats"
    with pytest.raises(DatasetError, match=r"shard-00000\.parquet.*'train-1'"):
        compute_stats(StatsParams(data=str(data), workers=1), out)
    assert not out.exists()


def test_a_dataset_without_train_split_is_refused(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "val-only", ["a", "b"], {"val": [np.zeros((4, 4))]}, 8)
    with pytest.raises(DatasetError, match="no 'train' split"):
        compute_stats(StatsParams(data=str(data), workers=1), tmp_path / "stats")


def test_missing_or_malformed_stats_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "stats.json"))):
        load_weights(tmp_path, "median_frequency", ["a"])
    (tmp_path / "stats.json").write_text('{"class_names": ["a"], "weights": {}}')
    with pytest.raises(DatasetError, match=r"stats\.json: malformed"):
        load_weights(tmp_path, "median_frequency", ["a"])
    with pytest.raises(ConfigError, match="'median'"):
        load_weights(tmp_path, "median", ["a"])


def test_weights_of_other_classes_or_another_train_split_are_refused(
    hand_dataset: Path, tmp_path: Path
) -> None:
    compute_stats(StatsParams(data=str(hand_dataset), workers=1), tmp_path / "s")
    names = read_stats(tmp_path / "s")["class_names"]
    weights, _ = load_weights(tmp_path / "s", "enet", names, train_images=3)
    assert weights.shape == (len(names),)
    with pytest.raises(DatasetError, match="differ from the dataset's"):
        load_weights(tmp_path / "s", "enet", [*names, "extra"])
    with pytest.raises(DatasetError, match="counts 3 train images, the dataset has 4"):
        load_weights(tmp_path / "s", "enet", names, train_images=4)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"workers": -1}, "stats.workers"),
        ({"bogus": 1}, "stats.bogus: unknown key"),
        ({"out": 3}, "stats.out"),
    ],
)
def test_bad_stats_params_name_the_key(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_params({"stats": section})


def test_cli_rejects_bad_params_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--params", str(REPO / "params.yaml"), "stats", "--data", str(tmp_path)]
    assert main([*argv, "--workers", "-2"]) == 1
    assert "stats.workers" in capsys.readouterr().err


def test_scheme_names_match_the_params_schema():
    from typing import get_args

    from fcn_pipeline.config import WeightScheme

    assert get_args(WeightScheme) == SCHEMES
