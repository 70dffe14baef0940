"""The patches stage: square training patches cut from the train split.

Patchwise training (FCN paper, section 3.4 and 4.4) trains on crops instead of
whole images; sampling the crops can correct class imbalance. This stage cuts
``P x P`` patches (``P = patch_size``) from every train image with one of three
strategies:

- ``grid``: every patch whose top-left corner lies on the grid ``0, stride,
  2 stride, ...`` (rows and columns) and that fits in the image; a strip at the
  bottom/right narrower than the stride is not covered.
- ``uniform``: ``patches_per_image`` corners drawn uniformly (with replacement)
  among all the corners where a patch fits.
- ``class_balanced``: ``patches_per_image`` patches centred on pixels drawn
  so that rare classes are over-sampled, using the class weights of the stats
  stage (scheme ``class_weighting``; ignore pixels weigh 0). Two rules
  (``centre_sampling``), both one ``rng.choice`` over a per-pixel weight map:

  - ``per_class`` (default): a class is drawn with probability proportional to
    its weight among the classes present in the image, then a pixel of that
    class uniformly (as a per-pixel weight map: ``w[c] / n_img[c]``). This is
    the usual class-uniform sampling, tilted by the weights.
  - ``per_pixel``: a pixel is drawn with probability proportional to the
    weight of its class (weight map ``w[mask]``), so a class gets centres in
    proportion to ``w[c] * n_img[c]``; with median-frequency weights that is
    roughly the same share for every class, which over-samples rare classes
    less (on the default synthetic set, 64x64 patches: 1.2x the uniform share
    of the rarest class, against 1.45x per class; 32x32: 1.6x against 2.55x).

  Both are drawn as a class first, then a uniform pixel of it, which is the
  same distribution as one draw over the weight map, without building it.

  The patch is centred on the drawn pixel (corner = centre - P // 2) and
  shifted inside the image where it would cross the border, so the pixel is
  always in its patch. An image whose pixels all weigh 0 falls back to
  ``uniform``.

Geometry: ``(y, x)`` is the top-left corner of the patch in its source image,
always ``>= 0``. An image smaller than ``P`` in a dimension is padded at the
bottom and/or right, the image with 0 (black) and the mask with the ignore
label 255, so the padding never enters a loss.

Determinism: the random draws for an image come from a generator seeded with
``(seed, stream, hash of the image id)``, so the patches depend only on the
parameters and the image, never on the worker count or the shard layout.

Uniform baseline: for every image the stage also draws, from an independent
stream, as many uniform corners as it cut patches, and counts the labels under
them (masks only, nothing decoded twice or encoded). ``patches.json`` reports
the class pixel shares of both sets and, for the rarest train class, the gain
of the chosen strategy over uniform sampling with the same budget.

Output: a directory that is itself an ingested dataset with a single ``train``
split (``dataset.json`` plus Parquet shards, read with the functions of
:mod:`fcn_pipeline.store`); rows follow ``PATCH_ROW_SCHEMA`` (``id``,
``split``, ``height``, ``width``, ``image``, ``mask``, ``source_id``, ``y``,
``x``); a patch id is ``<source_id>:<k>``, ``k`` its number in the image.
Each source image is decoded once and all its patches are cut from it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fcn_pipeline.atomic import atomic_output_dir, write_json
from fcn_pipeline.class_weights import WEIGHTS_SPLIT, load_class_weights
from fcn_pipeline.errors import DatasetError
from fcn_pipeline.parallel import ShardMapper, map_shards
from fcn_pipeline.store import (
    IGNORE_INDEX,
    META_FILE,
    PATCH_ROW_SCHEMA,
    DatasetMeta,
    ShardInfo,
    count_labels,
    decode_image,
    decode_mask,
    encode_png,
    iter_shard,
    read_dataset_meta,
    shard_paths,
    write_shard,
)

if TYPE_CHECKING:  # worker processes import this module; keep pydantic out of their start-up
    from fcn_pipeline.config import PatchesParams

SUMMARY_FILE = "patches.json"
SPLIT = WEIGHTS_SPLIT  # patches are cut from the train split and stored as one
PATCH_STREAM, BASELINE_STREAM = 0, 1  # independent random streams per image
WINDOW_CHUNK_PIXELS = 1 << 22  # label counting gathers at most this many pixels at once


# --- geometry -----------------------------------------------------------------


def image_rng(seed: int, image_id: str, stream: int) -> np.random.Generator:
    """The generator of one image: depends on ``(seed, stream, image_id)`` only."""
    digest = hashlib.blake2b(image_id.encode(), digest_size=8).digest()
    return np.random.default_rng([seed, stream, int.from_bytes(digest, "little")])


def pad_to(array: np.ndarray, size: int, fill: int) -> np.ndarray:
    """Pad an ``(H, W, ...)`` array at the bottom/right to at least ``size x size``."""
    height, width = array.shape[:2]
    if height >= size and width >= size:
        return array
    pad = [(0, max(0, size - height)), (0, max(0, size - width))]
    pad += [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, constant_values=fill)


def grid_positions(
    height: int, width: int, size: int, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """Corners ``(ys, xs)`` (int64, row-major) of the grid patches of a padded image."""
    ys = np.arange(0, height - size + 1, stride)
    xs = np.arange(0, width - size + 1, stride)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    return grid_y.ravel(), grid_x.ravel()


def uniform_positions(
    rng: np.random.Generator, height: int, width: int, size: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` corners ``(ys, xs)`` (int64) drawn uniformly in a padded image."""
    return (
        rng.integers(0, height - size + 1, size=count),
        rng.integers(0, width - size + 1, size=count),
    )


def class_balanced_positions(
    rng: np.random.Generator,
    mask: np.ndarray,
    size: int,
    count: int,
    weights: np.ndarray,
    centre_sampling: str = "per_class",
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` corners of patches centred on pixels drawn by class weight.

    ``mask``: ``(H, W)`` uint8 (unpadded); ``weights``: ``(K,)`` float >= 0
    (labels ``>= K``, the ignore label among them, are never drawn).
    ``centre_sampling``: ``per_class`` (class ``c`` drawn with probability
    ``w[c] / sum of w over the classes in the image``) or ``per_pixel``
    (probability ``∝ w[c] * pixels of c``, i.e. each pixel ``∝ w[mask]``);
    the centre is then a uniform pixel of the drawn class. Drawing the class
    first gives exactly the per-pixel distribution of the weight map without
    building it. Returns int64 ``(ys, xs)`` valid in the mask padded to at
    least ``size x size``.
    """
    height, width = mask.shape
    padded_h, padded_w = max(height, size), max(width, size)
    in_image = count_labels(mask)[: len(weights)]
    if centre_sampling == "per_class":
        mass = np.where(in_image > 0, weights, 0.0)
    elif centre_sampling == "per_pixel":
        mass = weights * in_image
    else:
        raise ValueError(f"unknown centre sampling {centre_sampling!r}")
    total = mass.sum()
    if not total > 0:
        return uniform_positions(rng, padded_h, padded_w, size, count)
    classes = rng.choice(len(mass), size=count, p=mass / total)
    flat = mask.reshape(-1)
    centres = np.empty(count, dtype=np.int64)
    for label in np.unique(classes):  # at most K passes over the mask
        drawn = classes == label
        pixels = np.flatnonzero(flat == label)
        centres[drawn] = pixels[rng.integers(0, pixels.size, size=int(drawn.sum()))]
    centre_y, centre_x = np.divmod(centres, width)
    return (
        np.clip(centre_y - size // 2, 0, padded_h - size),
        np.clip(centre_x - size // 2, 0, padded_w - size),
    )


def window_label_counts(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int) -> np.ndarray:
    """Label histogram ``(256,)`` int64 of the ``size x size`` windows of a padded mask.

    Windows are gathered a bounded chunk at a time (no per-patch loop).
    """
    windows = sliding_window_view(mask, (size, size))
    counts = np.zeros(256, dtype=np.int64)
    chunk = max(1, WINDOW_CHUNK_PIXELS // (size * size))
    for start in range(0, len(ys), chunk):
        counts += count_labels(windows[ys[start : start + chunk], xs[start : start + chunk]])
    return counts


# --- one shard, in a worker ---------------------------------------------------


@dataclass(frozen=True)
class PatchSettings:
    """What a worker needs to cut the patches of one source shard."""

    strategy: str
    centre_sampling: str
    patch_size: int
    stride: int
    patches_per_image: int
    seed: int
    shard_size: int
    weights: np.ndarray  # (K,) float64, used by class_balanced

    @classmethod
    def from_params(cls, params: PatchesParams, weights: np.ndarray) -> PatchSettings:
        return cls(
            params.strategy,
            params.centre_sampling,
            params.patch_size,
            params.stride,
            params.patches_per_image,
            params.seed,
            params.shard_size,
            weights,
        )


@dataclass
class ShardPatches:
    """What one worker wrote and counted."""

    shards: list[ShardInfo] = field(default_factory=list)
    images: int = 0
    patches: int = 0
    label_counts: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    baseline_counts: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))


def patch_positions(
    settings: PatchSettings, image_id: str, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Corners ``(ys, xs)`` (int64) of the patches of one image under ``settings``."""
    size = settings.patch_size
    padded_h, padded_w = max(mask.shape[0], size), max(mask.shape[1], size)
    if settings.strategy == "grid":
        return grid_positions(padded_h, padded_w, size, settings.stride)
    rng = image_rng(settings.seed, image_id, PATCH_STREAM)
    count = settings.patches_per_image
    if settings.strategy == "uniform":
        return uniform_positions(rng, padded_h, padded_w, size, count)
    if settings.strategy == "class_balanced":
        return class_balanced_positions(
            rng, mask, size, count, settings.weights, settings.centre_sampling
        )
    raise ValueError(f"unknown patch strategy {settings.strategy!r}")


def extract_shard(
    source: Path, number: int, settings: PatchSettings, out_dir: Path
) -> ShardPatches:
    """Cut the patches of every image of one source shard; write them under ``out_dir``.

    Output shards are ``train/shard-<number>-<part>.parquet`` of at most
    ``settings.shard_size`` patches; memory holds one source image and one
    output shard. Runs in a worker process.
    """
    size = settings.patch_size
    result = ShardPatches()
    rows: list[dict[str, Any]] = []

    def flush() -> None:
        relpath = f"{SPLIT}/shard-{number:05d}-{len(result.shards):04d}.parquet"
        write_shard(out_dir / relpath, rows, schema=PATCH_ROW_SCHEMA)
        result.shards.append(ShardInfo(relpath, len(rows)))
        rows.clear()

    for row in iter_shard(source, columns=["id", "image", "mask"]):
        source_id = row["id"]
        try:
            image, mask = decode_image(row["image"]), decode_mask(row["mask"])
        except (OSError, ValueError, SyntaxError) as error:
            raise DatasetError(f"{source}: {source_id!r} does not decode ({error})") from None
        if image.shape[:2] != mask.shape:
            raise DatasetError(f"{source}: {source_id!r} image and mask differ in size")
        ys, xs = patch_positions(settings, source_id, mask)
        image, mask = pad_to(image, size, 0), pad_to(mask, size, IGNORE_INDEX)
        result.label_counts += window_label_counts(mask, ys, xs, size)
        baseline = image_rng(settings.seed, source_id, BASELINE_STREAM)
        base_ys, base_xs = uniform_positions(baseline, *mask.shape, size, len(ys))
        result.baseline_counts += window_label_counts(mask, base_ys, base_xs, size)
        for k, (y, x) in enumerate(zip(ys.tolist(), xs.tolist(), strict=True)):
            rows.append(
                {
                    "id": f"{source_id}:{k:04d}",
                    "split": SPLIT,
                    "height": size,
                    "width": size,
                    "image": encode_png(np.ascontiguousarray(image[y : y + size, x : x + size])),
                    "mask": encode_png(np.ascontiguousarray(mask[y : y + size, x : x + size])),
                    "source_id": source_id,
                    "y": y,
                    "x": x,
                }
            )
            if len(rows) == settings.shard_size:
                flush()
        result.images += 1
        result.patches += len(ys)
    if rows:
        flush()
    return result


# --- the stage ----------------------------------------------------------------


@dataclass(frozen=True)
class PatchesResult:
    out: Path
    meta: DatasetMeta
    summary: dict[str, Any]
    seconds: float

    @property
    def patches(self) -> int:
        return self.meta.split_images(SPLIT)


def _share(counts: np.ndarray, num_classes: int) -> list[float]:
    labelled = counts[:num_classes]
    total = labelled.sum()
    return (labelled / total).tolist() if total else [0.0] * num_classes


def patches_summary(
    params: PatchesParams, meta: DatasetMeta, stats: dict[str, Any], merged: ShardPatches
) -> dict[str, Any]:
    """The content of ``patches.json`` (plain JSON types)."""
    k = meta.num_classes
    share = _share(merged.label_counts, k)
    baseline_share = _share(merged.baseline_counts, k)
    train_pixels = np.asarray(stats["splits"][SPLIT]["pixels"], dtype=np.int64)
    rarest = None
    if (train_pixels > 0).any():
        index = int(np.argmin(np.where(train_pixels > 0, train_pixels, np.iinfo(np.int64).max)))
        gain = share[index] / baseline_share[index] if baseline_share[index] > 0 else None
        rarest = {
            "index": index,
            "name": meta.class_names[index],
            "train_share": float(train_pixels[index] / train_pixels.sum()),
            "share": share[index],
            "uniform_share": baseline_share[index],
            "gain_over_uniform": gain,
        }
    return {
        "params": params.model_dump(mode="json"),
        "class_names": meta.class_names,
        "source_images": merged.images,
        "patches": merged.patches,
        "patch_size": params.patch_size,
        "labelled_pixels": int(merged.label_counts[:k].sum()),
        "ignored_pixels": int(merged.label_counts[IGNORE_INDEX]),
        "class_pixels": merged.label_counts[:k].tolist(),
        "class_share": share,
        "uniform_baseline": {
            "patches": merged.patches,
            "class_pixels": merged.baseline_counts[:k].tolist(),
            "class_share": baseline_share,
        },
        "rarest_class": rarest,
    }


def extract_patches(
    params: PatchesParams,
    out: str | Path | None = None,
    *,
    on_shard: Callable[[Path, ShardPatches], None] | None = None,
    mapper: ShardMapper = map_shards,
) -> PatchesResult:
    """Cut the patches of the train split of ``params.data`` into ``out`` atomically.

    Reads ``params.stats`` (always: it must describe the same dataset, and it
    names the rarest train class). ``on_shard(source_shard, result)`` is
    called as each source shard is done; ``mapper`` runs the shard calls (see
    :mod:`fcn_pipeline.parallel`). Raises :class:`DatasetError` naming
    the path when the dataset or the statistics are missing or do not match.
    """
    start = time.perf_counter()
    out = Path(out or params.out)
    meta = read_dataset_meta(params.data)
    sources = shard_paths(params.data, SPLIT, meta)
    weights, stats = load_class_weights(
        params.stats,
        params.class_weighting,
        meta.class_names,
        train_images=meta.split_images(SPLIT),
    )
    settings = PatchSettings.from_params(params, weights)
    merged = ShardPatches()
    with atomic_output_dir(out) as tmp:
        calls = [(source, i, settings, tmp) for i, source in enumerate(sources)]
        results = mapper(extract_shard, calls, params.workers)
        for source, shard in zip(sources, results, strict=True):
            merged.shards += shard.shards
            merged.images += shard.images
            merged.patches += shard.patches
            merged.label_counts += shard.label_counts
            merged.baseline_counts += shard.baseline_counts
            if on_shard:
                on_shard(source, shard)
        patch_meta = DatasetMeta(
            source={
                "format": "patches",
                "data": str(params.data),
                "stats": str(params.stats),
                "strategy": params.strategy,
                "patch_size": params.patch_size,
            },
            class_names=meta.class_names,
            class_colors=meta.class_colors,
            ignore_index=IGNORE_INDEX,
            splits={SPLIT: merged.shards},
        )
        summary = patches_summary(params, meta, stats, merged)
        write_json(tmp / META_FILE, patch_meta.to_json())
        write_json(tmp / SUMMARY_FILE, summary)
    return PatchesResult(out, patch_meta, summary, time.perf_counter() - start)
