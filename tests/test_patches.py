"""The patches stage: crops, strategies, determinism, class balancing, failures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from fcn_pipeline.config import (
    DataParams,
    PatchesParams,
    StatsParams,
    SyntheticParams,
    parse_params,
)
from fcn_pipeline.errors import ConfigError, DatasetError
from fcn_pipeline.ingest import ingest
from fcn_pipeline.patches import extract_patches
from fcn_pipeline.store import (
    IGNORE_INDEX,
    META_FILE,
    ROW_SCHEMA,
    decode_image,
    decode_mask,
    iter_shard,
    read_dataset_meta,
    shard_paths,
)
from flows.cli import main
from tests.conftest import compute_stats

REPO = Path(__file__).resolve().parents[1]
SIDE = 64
SMALL_SYNTHETIC = SyntheticParams(height=SIDE, width=SIDE, splits={"train": 12, "val": 2})


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small synthetic dataset (64x64 images, shards of 5) and its statistics."""
    root = tmp_path_factory.mktemp("patches")
    ingest(DataParams(synthetic=SMALL_SYNTHETIC, shard_size=5, workers=1), root / "ingested")
    compute_stats(StatsParams(data=str(root / "ingested"), workers=1), root / "stats")
    return {"data": root / "ingested", "stats": root / "stats", "root": root}


def params(small: dict[str, Path], **changes) -> PatchesParams:
    values = {"data": str(small["data"]), "stats": str(small["stats"]), "workers": 1}
    return PatchesParams(**(values | changes))


def read_rows(root: Path, columns: list[str] | None = None) -> list[dict]:
    return [row for path in shard_paths(root, "train") for row in iter_shard(path, columns)]


def source_pairs(data: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        row["id"]: (decode_image(row["image"]), decode_mask(row["mask"]))
        for row in read_rows(data, ["id", "image", "mask"])
    }


# --- geometry -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "size"),
    [("grid", 24), ("uniform", 24), ("class_balanced", 24), ("uniform", 80)],
)
def test_every_patch_is_the_crop_of_its_source_at_y_x(
    small: dict[str, Path], tmp_path: Path, strategy: str, size: int
) -> None:
    result = extract_patches(params(small, strategy=strategy, patch_size=size, stride=16), tmp_path)
    sources = source_pairs(small["data"])
    rows = read_rows(tmp_path)
    assert len(rows) == result.summary["patches"] > 0
    for row in rows:
        image, mask = sources[row["source_id"]]
        y, x = row["y"], row["x"]
        assert 0 <= y <= max(0, SIDE - size) and 0 <= x <= max(0, SIDE - size)
        # Padding (only when the patch is larger than the image): bottom/right,
        # image 0, mask ignore.
        expected_image = np.zeros((size, size, 3), dtype=np.uint8)
        expected_mask = np.full((size, size), IGNORE_INDEX, dtype=np.uint8)
        crop = mask[y : y + size, x : x + size]
        expected_image[: crop.shape[0], : crop.shape[1]] = image[y : y + size, x : x + size]
        expected_mask[: crop.shape[0], : crop.shape[1]] = crop
        np.testing.assert_array_equal(decode_image(row["image"]), expected_image)
        np.testing.assert_array_equal(decode_mask(row["mask"]), expected_mask)
        assert (row["height"], row["width"], row["split"]) == (size, size, "train")


def test_grid_takes_every_stride_position(small: dict[str, Path], tmp_path: Path) -> None:
    extract_patches(params(small, strategy="grid", patch_size=24, stride=16), tmp_path)
    rows = read_rows(tmp_path, ["source_id", "y", "x"])
    corners = [0, 16, 32]  # 32 + 24 <= 64 < 48 + 24
    for source_id in source_pairs(small["data"]):
        got = sorted((r["y"], r["x"]) for r in rows if r["source_id"] == source_id)
        assert got == [(y, x) for y in corners for x in corners]


@pytest.mark.parametrize("strategy", ["uniform", "class_balanced"])
def test_random_strategies_cut_patches_per_image_with_unique_ids(
    small: dict[str, Path], tmp_path: Path, strategy: str
) -> None:
    extract_patches(params(small, strategy=strategy, patches_per_image=5), tmp_path)
    rows = read_rows(tmp_path, ["id", "source_id"])
    per_source = {}
    for row in rows:
        per_source[row["source_id"]] = per_source.get(row["source_id"], 0) + 1
    assert per_source == {source_id: 5 for source_id in source_pairs(small["data"])}
    assert len({row["id"] for row in rows}) == len(rows)


def test_each_source_image_is_decoded_once(
    small: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcn_pipeline.patches as patches_module

    calls = {"image": 0, "mask": 0}

    def counting(kind, decode):
        def wrapper(data: bytes) -> np.ndarray:
            calls[kind] += 1
            return decode(data)

        return wrapper

    monkeypatch.setattr(patches_module, "decode_image", counting("image", decode_image))
    monkeypatch.setattr(patches_module, "decode_mask", counting("mask", decode_mask))
    result = extract_patches(params(small, patches_per_image=6), tmp_path)  # workers=1
    assert result.summary["patches"] == 12 * 6
    assert calls == {"image": 12, "mask": 12}


# --- determinism ----------------------------------------------------------------


def patch_set(root: Path) -> set[tuple]:
    return {
        (r["id"], r["source_id"], r["y"], r["x"], r["image"], r["mask"]) for r in read_rows(root)
    }


def test_patches_do_not_depend_on_workers_or_source_sharding(
    small: dict[str, Path], tmp_path: Path
) -> None:
    resharded = tmp_path / "resharded"
    ingest(DataParams(synthetic=SMALL_SYNTHETIC, shard_size=3, workers=1), resharded)
    extract_patches(params(small), tmp_path / "a")
    extract_patches(params(small, data=str(resharded), workers=2, shard_size=7), tmp_path / "b")
    assert patch_set(tmp_path / "a") == patch_set(tmp_path / "b")
    assert read_dataset_meta(tmp_path / "b").splits["train"][0].images == 7
    extract_patches(params(small, seed=1), tmp_path / "c")
    assert patch_set(tmp_path / "a") != patch_set(tmp_path / "c")


# --- output contract ------------------------------------------------------------


def test_the_patch_set_is_an_ingested_dataset_with_a_summary(
    small: dict[str, Path], tmp_path: Path
) -> None:
    result = extract_patches(params(small, strategy="uniform", patch_size=40), tmp_path)
    meta = read_dataset_meta(tmp_path)
    source_meta = read_dataset_meta(small["data"])
    assert list(meta.splits) == ["train"]
    assert meta.class_names == source_meta.class_names
    assert meta.class_colors == source_meta.class_colors
    rows = read_rows(tmp_path, ROW_SCHEMA.names)  # the ingested-image reader works as is
    assert len(rows) == meta.split_images("train") == 12 * 8

    summary = json.loads((tmp_path / "patches.json").read_text())
    assert summary == result.summary
    assert summary["class_names"] == meta.class_names
    assert summary["params"]["strategy"] == "uniform" and summary["params"]["patch_size"] == 40
    assert summary["patches"] == len(rows) and summary["source_images"] == 12
    recount = np.zeros(256, dtype=np.int64)
    for row in rows:
        recount += np.bincount(decode_mask(row["mask"]).ravel(), minlength=256)
    k = len(meta.class_names)
    assert summary["class_pixels"] == recount[:k].tolist()
    assert summary["class_share"] == pytest.approx((recount[:k] / recount[:k].sum()).tolist())
    baseline = summary["uniform_baseline"]
    assert baseline["patches"] == len(rows)
    assert sum(baseline["class_pixels"]) == len(rows) * 40 * 40  # no ignore in synthetic
    train_pixels = json.loads((small["stats"] / "stats.json").read_text())["splits"]["train"]
    rarest = summary["rarest_class"]
    assert rarest["index"] == int(np.argmin(train_pixels["pixels"]))  # all classes present
    assert rarest["share"] == summary["class_share"][rarest["index"]]
    assert rarest["uniform_share"] == baseline["class_share"][rarest["index"]]


# --- class balancing ------------------------------------------------------------


def rarest_shares(data: Path, stats: Path, out: Path, **changes) -> tuple[float, float, str]:
    values = {"data": str(data), "stats": str(stats)} | changes
    rarest = extract_patches(PatchesParams(**values), out).summary["rarest_class"]
    return rarest["share"], rarest["uniform_share"], rarest["name"]


@pytest.mark.slow  # the default-size data: 2.5-3 s
def test_class_balanced_doubles_the_rarest_class_on_the_default_synthetic_set(
    tmp_path: Path,
) -> None:
    # The default generator and its 240 train images (val/test are not needed).
    train_only = SyntheticParams(splits={"train": 240})
    ingest(DataParams(synthetic=train_only), tmp_path / "ingested")
    # One process: starting a pool costs more than these small passes.
    compute_stats(StatsParams(data=str(tmp_path / "ingested"), workers=1), tmp_path / "stats")
    inputs = (tmp_path / "ingested", tmp_path / "stats")
    balanced, baseline, name = rarest_shares(*inputs, tmp_path / "balanced", workers=1)
    uniform, _, _ = rarest_shares(*inputs, tmp_path / "uniform", strategy="uniform", workers=1)
    assert name == "pole"
    assert balanced >= 2 * baseline  # the baseline drawn in the same run
    assert balanced >= 2 * uniform  # and an actual uniform patch set


@pytest.mark.slow  # the default-size data: 2.5-3 s
@pytest.mark.camvid
def test_class_balanced_doubles_the_rarest_class_on_camvid(
    camvid_ingested: Path, tmp_path: Path
) -> None:
    compute_stats(StatsParams(data=str(camvid_ingested)), tmp_path / "stats")
    balanced, baseline, name = rarest_shares(
        camvid_ingested, tmp_path / "stats", tmp_path / "patches", patch_size=64,
        patches_per_image=4,
    )  # fmt: skip
    assert name == "Bicyclist"
    assert balanced >= 2 * baseline


# --- bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"strategy": "random"}, "patches.strategy"),
        ({"class_weighting": "median"}, "patches.class_weighting"),
        ({"centre_sampling": "both"}, "patches.centre_sampling"),
        ({"patch_size": 0}, "patches.patch_size"),
        ({"patch_size": 5000}, "patches.patch_size"),
        ({"stride": 0}, "patches.stride"),
        ({"patches_per_image": 0}, "patches.patches_per_image"),
        ({"seed": -1}, "patches.seed"),
    ],
)
def test_bad_patch_params_name_the_key(section: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        parse_params({"patches": section})


@pytest.mark.parametrize(
    ("option", "key"),
    [
        (["--strategy", "random"], "patches.strategy"),
        (["--class-weighting", "median"], "patches.class_weighting"),
        (["--patch-size", "0"], "patches.patch_size"),
        (["--patch-size", "4097"], "patches.patch_size"),
        (["--stride", "0"], "patches.stride"),
    ],
)
def test_cli_rejects_bad_patch_options_before_running(
    option: list[str], key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--params", str(REPO / "params.yaml"), "patches", *option]) == 1
    assert key in capsys.readouterr().err


def test_missing_inputs_are_named_and_previous_output_survives(
    small: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "patches"
    out.mkdir()
    (out / "patches.json").write_text("previous")
    for changes, path in [
        ({"stats": str(tmp_path / "no-stats")}, tmp_path / "no-stats" / "stats.json"),
        ({"data": str(tmp_path / "no-data")}, tmp_path / "no-data"),
    ]:
        with pytest.raises(DatasetError, match=re.escape(str(path))):
            extract_patches(params(small, **changes), out)
        assert (out / "patches.json").read_text() == "previous"


def test_stats_of_another_dataset_are_refused(small: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    classes = ["background", "bus", "pole"]
    synthetic = SMALL_SYNTHETIC.model_copy(update={"classes": classes})
    ingest(DataParams(synthetic=synthetic, workers=1), other)
    compute_stats(StatsParams(data=str(other), workers=1), tmp_path / "other-stats")
    with pytest.raises(DatasetError, match=r"other-stats/stats\.json: classes .* differ"):
        extract_patches(params(small, stats=str(tmp_path / "other-stats")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_schema_mismatch_is_named(small: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    meta = json.loads((small["data"] / META_FILE).read_text())
    meta["schema_version"] = 0
    (copy / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=re.escape(str(copy / META_FILE))):
        extract_patches(params(small, data=str(copy)), tmp_path / "out")


# --- the stages through the CLI and Prefect -------------------------------------


@pytest.mark.slow
def test_stats_and_patches_stages_run_from_the_cli(small: dict[str, Path], tmp_path: Path):
    base = ["--params", str(REPO / "params.yaml")]
    stats, patches = tmp_path / "stats", tmp_path / "patches"
    data = str(small["data"])
    assert main([*base, "stats", "--data", data, "--out", str(stats), "--workers", "1"]) == 0
    assert (stats / "stats.json").is_file()
    argv = [*base, "patches", "--data", data, "--stats", str(stats), "--out", str(patches)]
    assert main([*argv, "--strategy", "grid", "--patch-size", "32", "--stride", "32"]) == 0
    summary = json.loads((patches / "patches.json").read_text())
    assert summary["params"]["strategy"] == "grid" and summary["patches"] == 12 * 4
    # A failure inside the stage: non-zero exit, the previous patch set intact.
    assert main([*argv, "--stats", str(tmp_path / "missing")]) == 1
    assert json.loads((patches / "patches.json").read_text()) == summary
