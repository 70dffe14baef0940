"""The ingest stage: every source round-trips, bad input is listed and loses nothing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcn_pipeline.config import DataParams, FolderParams, SyntheticParams
from fcn_pipeline.errors import ConfigError, InvalidInputError
from fcn_pipeline.ingest import ingest
from fcn_pipeline.sources import color_map
from fcn_pipeline.store import decode_image, decode_mask, iter_shard, read_dataset_meta, shard_paths


def save_png(path: Path, array: np.ndarray, palette: list[list[int]] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if palette is not None:
        image = image.convert("P") if image.mode != "P" else image
        image.putpalette([v for rgb in palette for v in rgb])
    image.save(path)


def make_camvid(root: Path, counts=None, size=(20, 30), seed=0) -> dict[str, np.ndarray]:
    """A SegNet-layout dataset; returns id -> the source mask (11 = void)."""
    rng = np.random.default_rng(seed)
    masks = {}
    for split, n in (counts or {"train": 3, "val": 2, "test": 2}).items():
        for i in range(n):
            stem = f"{split}_{i:03d}"
            save_png(root / split / f"{stem}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
            mask = rng.integers(0, 12, size, dtype=np.uint8)  # includes 11 (void)
            save_png(root / f"{split}annot" / f"{stem}.png", mask)
            masks[stem] = mask
    return masks


def make_voc(root: Path, ids=None, size=(24, 32), seed=0) -> dict[str, np.ndarray]:
    """A VOC2012-layout dataset with JPEG images and palette masks with 255 borders."""
    rng = np.random.default_rng(seed)
    ids = ids or {"train": ["2007_000001", "2007_000002", "2007_000003"], "val": ["2008_000001"]}
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    palette = color_map(256)
    masks = {}
    for split, names in ids.items():
        (lists / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
        for name in names:
            (root / "JPEGImages").mkdir(exist_ok=True)
            image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
            image.save(root / "JPEGImages" / f"{name}.jpg", quality=90)
            mask = np.zeros(size, np.uint8)
            mask[4:16, 6:20] = rng.integers(1, 21)
            mask[4, 6:20] = 255  # object boundary
            mask[15, 6:20] = 255
            save_png(root / "SegmentationClass" / f"{name}.png", mask, palette)
            masks[name] = mask
    return masks


def make_folder(root: Path, n=6, classes=("sky", "road", "car"), splits=None, size=(16, 16)):
    rng = np.random.default_rng(1)
    lines = [classes[0] + " 10 20 30", *classes[1:]]
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(lines) + "\n")
    masks = {}
    for i in range(n):
        stem = f"img{i}"
        save_png(root / "images" / f"{stem}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        mask = rng.integers(0, len(classes), size, dtype=np.uint8)
        mask[0, 0] = 255
        save_png(root / "masks" / f"{stem}.png", mask)
        masks[stem] = mask
    if splits:
        (root / "splits").mkdir()
        for split, stems in splits.items():
            (root / "splits" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return masks


def read_rows(out: Path) -> dict[str, dict]:
    meta = read_dataset_meta(out)
    return {
        row["id"]: row
        for split in meta.splits
        for path in shard_paths(out, split, meta)
        for row in iter_shard(path)
    }


def params(fmt: str, root: Path | None = None, **kwargs) -> DataParams:
    return DataParams(format=fmt, root=str(root) if root else None, workers=1, **kwargs)


# --- round trips --------------------------------------------------------------


def test_camvid_round_trip_maps_void_to_255_and_keeps_image_bytes(tmp_path):
    source = make_camvid(tmp_path / "camvid")
    out = tmp_path / "out"
    result = ingest(params("camvid", tmp_path / "camvid", shard_size=2), out)
    rows = read_rows(out)
    assert result.images == len(source) == len(rows)
    for stem, mask in source.items():
        row = rows[stem]
        split = row["split"]
        expected = np.where(mask == 11, 255, mask)
        np.testing.assert_array_equal(decode_mask(row["mask"]), expected)
        assert row["image"] == (tmp_path / "camvid" / split / f"{stem}.png").read_bytes()
        assert (row["height"], row["width"]) == mask.shape
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["class_names"][0] == "Sky" and meta["num_classes"] == 11
    assert meta["ignore_index"] == 255 and meta["schema_version"] == 1
    assert {s: v["images"] for s, v in meta["splits"].items()} == {"train": 3, "val": 2, "test": 2}
    assert all(s["images"] <= 2 for v in meta["splits"].values() for s in v["shards"])


@pytest.mark.parametrize("resample", ["area", "bilinear"])
def test_scale_shrinks_images_with_the_filter_and_masks_with_nearest(tmp_path, resample):
    source = make_camvid(tmp_path / "camvid", size=(21, 30))
    out = tmp_path / "out"
    ingest(params("camvid", tmp_path / "camvid", scale=0.5, resample=resample), out)
    rows = read_rows(out)
    filters = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR}
    for stem, mask in source.items():
        row = rows[stem]
        assert (row["height"], row["width"]) == (11, 15)  # 10.5 rounds up
        original = Image.open(tmp_path / "camvid" / row["split"] / f"{stem}.png")
        expected = np.asarray(original.convert("RGB").resize((15, 11), filters[resample]))
        np.testing.assert_array_equal(decode_image(row["image"]), expected)  # PNG: lossless
        # Nearest samples the source at each output pixel's centre: (2i + 1) / 2 * 21 / 11.
        rows_at = np.floor((np.arange(11) + 0.5) * 21 / 11).astype(int)
        cols_at = np.floor((np.arange(15) + 0.5) * 30 / 15).astype(int)
        expected_mask = np.where(mask == 11, 255, mask)[np.ix_(rows_at, cols_at)]
        np.testing.assert_array_equal(decode_mask(row["mask"]), expected_mask)
    source_info = json.loads((out / "dataset.json").read_text())["source"]
    assert (source_info["scale"], source_info["resample"]) == (0.5, resample)


def test_area_and_bilinear_shrink_differently_and_keep_flat_regions(tmp_path):
    root = tmp_path / "camvid"
    make_camvid(root, counts={"train": 1, "val": 1, "test": 1}, size=(16, 16))
    stripes = np.zeros((16, 16, 3), np.uint8)
    stripes[:, ::2] = 200  # one-pixel columns: area keeps their mean, 100, everywhere
    save_png(root / "train" / "train_000.png", stripes)
    images = {}
    for resample in ("area", "bilinear"):
        ingest(params("camvid", root, scale=0.25, resample=resample), tmp_path / resample)
        images[resample] = decode_image(read_rows(tmp_path / resample)["train_000"]["image"])
    assert images["area"].shape == (4, 4, 3)
    np.testing.assert_array_equal(images["area"], np.full((4, 4, 3), 100, np.uint8))
    assert not np.array_equal(images["area"], images["bilinear"])


def test_voc_keeps_jpeg_bytes_and_palette_indices_with_255_borders(tmp_path):
    source = make_voc(tmp_path / "voc")
    out = tmp_path / "out"
    ingest(params("voc", tmp_path / "voc"), out)
    rows = read_rows(out)
    assert set(rows) == set(source)
    for name, mask in source.items():
        np.testing.assert_array_equal(decode_mask(rows[name]["mask"]), mask)
        assert rows[name]["image"] == (tmp_path / "voc" / "JPEGImages" / f"{name}.jpg").read_bytes()
    meta = read_dataset_meta(out)
    assert meta.num_classes == 21 and meta.class_names[15] == "person"
    assert meta.class_colors[1] == [128, 0, 0] and meta.class_colors[15] == [192, 128, 128]
    assert set(meta.splits) == {"train", "val"}


def test_folder_with_split_lists_and_class_file(tmp_path):
    splits = {"train": ["img0", "img1", "img2", "img3"], "val": ["img4"], "test": ["img5"]}
    source = make_folder(tmp_path / "f", splits=splits)
    out = tmp_path / "out"
    ingest(params("folder", tmp_path / "f"), out)
    rows = read_rows(out)
    for stem, mask in source.items():
        np.testing.assert_array_equal(decode_mask(rows[stem]["mask"]), mask)
    assert {r["split"] for r in rows.values() if r["id"] in splits["train"]} == {"train"}
    meta = read_dataset_meta(out)
    assert meta.class_names == ["sky", "road", "car"]
    assert meta.class_colors[0] == [10, 20, 30]
    assert meta.class_colors[1] == color_map(3)[1]


def test_folder_without_lists_splits_by_stable_hash_and_reencodes_bmp(tmp_path):
    root = tmp_path / "f"
    make_folder(root, n=8)
    bmp = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    (root / "images" / "img0.png").unlink()
    Image.fromarray(bmp).save(root / "images" / "img0.bmp")
    fractions = FolderParams(split_fractions={"train": 0.5, "val": 0.5})
    first = read_rows(ingest(params("folder", root, folder=fractions), tmp_path / "a").out)
    second = read_rows(ingest(params("folder", root, folder=fractions), tmp_path / "b").out)
    assert {k: r["split"] for k, r in first.items()} == {k: r["split"] for k, r in second.items()}
    assert {r["split"] for r in first.values()} == {"train", "val"}
    assert first["img0"]["image"].startswith(b"\x89PNG")
    np.testing.assert_array_equal(decode_image(first["img0"]["image"]), bmp)


def test_parallel_workers_write_the_same_dataset(tmp_path):
    make_camvid(tmp_path / "camvid", counts={"train": 5, "val": 2, "test": 2})
    serial = read_rows(
        ingest(params("camvid", tmp_path / "camvid", shard_size=2), tmp_path / "a").out
    )
    config = DataParams(format="camvid", root=str(tmp_path / "camvid"), shard_size=2, workers=2)
    parallel = read_rows(ingest(config, tmp_path / "b").out)
    assert serial == parallel


# --- bad input ------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])


def resize_mask(path: Path) -> None:
    save_png(path, np.zeros((5, 5), np.uint8))


def bad_values(path: Path) -> None:
    mask = np.array(Image.open(path))
    mask[0, 0] = 42
    save_png(path, mask)


def rgb_mask(path: Path) -> None:
    save_png(path, np.zeros((20, 30, 3), np.uint8))


@pytest.mark.parametrize(
    ("damage", "victim", "named", "reason"),
    [
        (truncate, "train/train_001.png", None, "image does not decode"),
        (truncate, "trainannot/train_001.png", None, "mask does not decode"),
        (resize_mask, "trainannot/train_001.png", None, "mask is 5x5, image is 20x30"),
        (bad_values, "valannot/val_000.png", None, "mask values [42] outside 0..11"),
        (rgb_mask, "testannot/test_001.png", None, "mask has mode 'RGB', expected a"),
        (Path.unlink, "trainannot/train_002.png", "train/train_002.png", "no mask in"),
        (Path.unlink, "val/val_001.png", "valannot/val_001.png", "no image in"),
    ],
)
def test_bad_pairs_are_listed_and_previous_output_survives(tmp_path, damage, victim, named, reason):
    root = tmp_path / "camvid"
    make_camvid(root)
    out = tmp_path / "out"
    ingest(params("camvid", root), out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    damage(root / victim)
    with pytest.raises(InvalidInputError) as caught:
        ingest(params("camvid", root), out)
    message = str(caught.value)
    assert f"{root / (named or victim)}: {reason}" in message
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["camvid", "out"]  # no temp dirs left


def test_empty_split_and_missing_directory(tmp_path):
    root = tmp_path / "camvid"
    make_camvid(root, counts={"train": 2, "val": 0, "test": 1})
    (root / "val").mkdir()
    (root / "valannot").mkdir()
    (root / "testannot").rename(root / "elsewhere")
    with pytest.raises(InvalidInputError) as caught:
        ingest(params("camvid", root), tmp_path / "out")
    assert "split 'val' has no image/mask pairs" in str(caught.value)
    assert f"{root / 'testannot'}: directory missing" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_duplicate_ids_across_voc_splits(tmp_path):
    make_voc(tmp_path / "voc", ids={"train": ["a", "b"], "val": ["c"]})
    lists = tmp_path / "voc" / "ImageSets" / "Segmentation"
    (lists / "val.txt").write_text("c\na\n")
    with pytest.raises(InvalidInputError, match="duplicate id 'a'"):
        ingest(params("voc", tmp_path / "voc"), tmp_path / "out")


def test_voc_listed_but_missing_and_bad_class_value(tmp_path):
    root = tmp_path / "voc"
    make_voc(root)
    (root / "JPEGImages" / "2007_000002.jpg").unlink()
    mask = np.array(Image.open(root / "SegmentationClass" / "2007_000003.png"))
    mask[0, 0] = 30
    save_png(root / "SegmentationClass" / "2007_000003.png", mask, color_map(256))
    with pytest.raises(InvalidInputError) as caught:
        ingest(params("voc", root), tmp_path / "out")
    message = str(caught.value)
    assert "2007_000002.jpg: listed in train.txt but missing" in message
    assert "2007_000003.png: mask values [30] are neither a class (0..20) nor 255" in message


def test_folder_class_file_problems(tmp_path):
    root = tmp_path / "f"
    make_folder(root, splits={"train": ["img0", "img1", "img2", "img3", "img4", "img5"]})
    (root / "classes.txt").write_text("sky\nroad 1 2\nsky\n")
    with pytest.raises(InvalidInputError) as caught:
        ingest(params("folder", root), tmp_path / "out")
    message = str(caught.value)
    assert "classes.txt:2: expected 'name' or 'name R G B'" in message
    assert "classes.txt:3: duplicate class name 'sky'" in message


def test_problem_list_shows_first_20_and_a_count(tmp_path):
    root = tmp_path / "camvid"
    make_camvid(root, counts={"train": 25, "val": 1, "test": 1})
    for path in sorted((root / "trainannot").iterdir()):
        bad_values(path)
    with pytest.raises(InvalidInputError) as caught:
        ingest(params("camvid", root), tmp_path / "out")
    lines = str(caught.value).splitlines()
    assert lines[0].endswith("25 problem(s)")
    assert len(lines) == 1 + 20 + 1 and lines[-1] == "  ... and 5 more"


def test_missing_root_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.root: required"):
        ingest(params("camvid"), tmp_path / "out")
    with pytest.raises(ConfigError, match="is not a directory"):
        ingest(params("voc", tmp_path / "nowhere"), tmp_path / "out")


def test_cli_rejects_bad_params_before_any_work(tmp_path, capsys):
    from flows.cli import main

    params_file = tmp_path / "params.yaml"
    params_file.write_text("data:\n  shard_size: -1\n")
    assert main(["--params", str(params_file), "ingest"]) == 1
    assert "data.shard_size" in capsys.readouterr().err


def test_cli_exits_nonzero_when_the_stage_fails(tmp_path):
    from flows.cli import main

    assert main(["ingest", "--format", "camvid", "--root", str(tmp_path / "absent")]) == 1
    tiny = "data.synthetic.splits={train: 2, val: 1, test: 1}"
    assert main(["ingest", "--out", str(tmp_path / "ok"), "--workers", "1", "-S", tiny]) == 0
    assert (tmp_path / "ok" / "dataset.json").is_file()


# --- the synthetic default ---------------------------------------------------------


def small_synthetic(**kwargs) -> SyntheticParams:
    return SyntheticParams(height=48, width=64, splits={"train": 12, "val": 3, "test": 3}, **kwargs)


def test_synthetic_is_deterministic_and_independent_of_sharding(tmp_path):
    a = read_rows(
        ingest(params("synthetic", synthetic=small_synthetic(), shard_size=5), tmp_path / "a").out
    )
    b = read_rows(
        ingest(params("synthetic", synthetic=small_synthetic(), shard_size=64), tmp_path / "b").out
    )
    c = read_rows(
        ingest(params("synthetic", synthetic=small_synthetic(seed=1)), tmp_path / "c").out
    )
    assert a == b
    assert a["train-00000"]["image"] != c["train-00000"]["image"]
    assert len(a) == 18 and {r["split"] for r in a.values()} == {"train", "val", "test"}


def test_synthetic_scenes_have_the_promised_structure():
    from fcn_pipeline.sources.synthetic import render_scene

    config = SyntheticParams()
    masks = np.stack([render_scene(config, "train", i)[1] for i in range(200)])
    share = np.bincount(masks.ravel(), minlength=6) / masks.size
    names = config.classes
    assert share.argmax() == names.index("background") and share[0] > 0.5
    assert share[names.index("pole")] < 0.02  # rare, thin
    assert share[names.index("pole")] == min(share)
    bus = names.index("bus")
    assert np.mean((masks == bus).mean(axis=(1, 2)) > 0.5) > 0.1  # the "bus fills the image" case
    assert (masks.max(axis=(1, 2)) > 0).all()


def test_synthetic_colours_do_not_identify_classes():
    """Every class draws its colours from the same distribution: mean colours agree."""
    from fcn_pipeline.sources.synthetic import render_scene

    config = SyntheticParams(noise_std=0.0)
    pairs = [render_scene(config, "train", i) for i in range(150)]
    images = np.concatenate([im.reshape(-1, 3) for im, _ in pairs]).astype(float) / 255
    labels = np.concatenate([m.ravel() for _, m in pairs])
    means = np.stack([images[labels == c].mean(axis=0) for c in range(len(config.classes))])
    assert np.abs(means - means.mean(axis=0)).max() < 0.08


# --- the real dataset ---------------------------------------------------------------


@pytest.mark.camvid
def test_real_camvid_counts_and_masks(camvid_root, camvid_ingested):
    meta = read_dataset_meta(camvid_ingested)
    assert {s: meta.split_images(s) for s in meta.splits} == {"train": 367, "val": 101, "test": 233}
    first = next(iter_shard(shard_paths(camvid_ingested, "test", meta)[0]))
    original = np.array(Image.open(camvid_root / "testannot" / f"{first['id']}.png"))
    np.testing.assert_array_equal(
        decode_mask(first["mask"]), np.where(original == 11, 255, original)
    )
    image = decode_image(first["image"])
    assert image.shape == (360, 480, 3)
    assert first["image"] == (camvid_root / "test" / f"{first['id']}.png").read_bytes()


def test_png_codec_round_trip():
    from fcn_pipeline.store import encode_png

    mask = np.random.default_rng(0).integers(0, 256, (7, 9), dtype=np.uint8)
    assert np.array_equal(decode_mask(encode_png(mask)), mask)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(mask.astype(np.int32))
    rgba = io.BytesIO()
    Image.fromarray(np.zeros((3, 3, 4), np.uint8)).save(rgba, format="PNG")
    assert decode_image(rgba.getvalue()).shape == (3, 3, 3)
