"""The stats stage: exact per-class pixel counts of an ingested dataset, and class weights.

The shards are streamed in worker processes (one shard at a time per worker,
only the ``mask`` column is read), every mask is decoded once and counted
exactly in ``np.int64``; the per-shard counts are summed, so the result does
not depend on how the dataset was sharded nor on the order shards finish.
Ignore pixels (255) are counted apart and never enter any statistic.

Per split and class ``c`` the stage records:

- ``pixels[c]``: labelled pixels of class ``c``;
- ``images_with_class[c]``: images with at least one pixel of ``c``;
- ``image_pixels_with_class[c]``: labelled pixels of those images (all classes).

Class weights of every scheme (see :mod:`fcn_pipeline.class_weights`) are
computed on the train split at once, so training can switch scheme without
re-running this stage. A class absent from train gets an
:class:`AbsentClassWarning` naming it.
"""

from __future__ import annotations

import csv
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fcn_pipeline.atomic import atomic_output_dir, write_json
from fcn_pipeline.class_weights import SCHEMES, STATS_FILE, WEIGHTS_SPLIT, scheme_weights
from fcn_pipeline.errors import DatasetError
from fcn_pipeline.parallel import ShardMapper, map_shards
from fcn_pipeline.store import (
    IGNORE_INDEX,
    DatasetMeta,
    count_labels,
    decode_mask,
    iter_shard,
    read_dataset_meta,
    shard_paths,
)

FREQUENCY_DIR = "class_frequency"  # one CSV per split: class, split, share, ...
FREQUENCY_PNG = "class_frequency.png"


class AbsentClassWarning(UserWarning):
    """A class has no labelled pixel in the train split: its weight is 0 (1 in ``none``)."""


# --- counting -----------------------------------------------------------------


@dataclass
class SplitCounts:
    """Exact per-class counts of one split; each array is ``(K,)`` int64.

    Counts from disjoint sets of images add up (``a + b``), which is how the
    per-shard results are merged.
    """

    images: int
    pixels: np.ndarray
    images_with_class: np.ndarray
    image_pixels_with_class: np.ndarray
    ignored_pixels: int = 0

    @classmethod
    def zeros(cls, num_classes: int) -> SplitCounts:
        """Counts of an empty split with ``num_classes`` classes."""
        zero = np.zeros(num_classes, dtype=np.int64)
        return cls(0, zero.copy(), zero.copy(), zero.copy(), 0)

    @classmethod
    def from_histograms(cls, histograms: np.ndarray, num_classes: int) -> SplitCounts:
        """Counts of images given their label histograms, ``(n, 256)`` int64."""
        per_class = histograms[:, :num_classes]
        present = per_class > 0
        labelled = per_class.sum(axis=1)
        return cls(
            images=int(histograms.shape[0]),
            pixels=per_class.sum(axis=0),
            images_with_class=present.sum(axis=0, dtype=np.int64),
            image_pixels_with_class=(present * labelled[:, None]).sum(axis=0, dtype=np.int64),
            ignored_pixels=int(histograms[:, IGNORE_INDEX].sum()),
        )

    def __add__(self, other: SplitCounts) -> SplitCounts:
        return SplitCounts(
            self.images + other.images,
            self.pixels + other.pixels,
            self.images_with_class + other.images_with_class,
            self.image_pixels_with_class + other.image_pixels_with_class,
            self.ignored_pixels + other.ignored_pixels,
        )

    @property
    def num_classes(self) -> int:
        return len(self.pixels)

    @property
    def labelled_pixels(self) -> int:
        return int(self.pixels.sum())

    @property
    def present(self) -> np.ndarray:
        """``(K,)`` bool: the class has at least one labelled pixel."""
        return self.pixels > 0

    @property
    def pixel_share(self) -> np.ndarray:
        """``(K,)`` float64: share of each class among the labelled pixels (0 if none)."""
        total = self.labelled_pixels
        return self.pixels / total if total else np.zeros(self.num_classes)

    @property
    def frequency(self) -> np.ndarray:
        """``(K,)`` float64: median-frequency ``freq(c)`` (0 where the class is absent)."""
        return np.divide(
            self.pixels,
            self.image_pixels_with_class,
            out=np.zeros(self.num_classes),
            where=self.image_pixels_with_class > 0,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "labelled_pixels": self.labelled_pixels,
            "ignored_pixels": self.ignored_pixels,
            "pixels": self.pixels.tolist(),
            "images_with_class": self.images_with_class.tolist(),
            "image_pixels_with_class": self.image_pixels_with_class.tolist(),
            "pixel_share": self.pixel_share.tolist(),
            "frequency": self.frequency.tolist(),
        }


@dataclass
class DatasetCounts:
    """Counts of every split of an ingested dataset, in ``dataset.json`` order."""

    data: Path
    meta: DatasetMeta
    splits: dict[str, SplitCounts] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return self.meta.class_names


def count_shard(path: str | Path, num_classes: int) -> SplitCounts:
    """Count the masks of one ingested shard (runs in a worker process).

    Raises :class:`DatasetError` naming the shard and image when a mask holds
    a value that is neither a class (``0..num_classes-1``) nor 255.
    """
    ids: list[str] = []
    histograms: list[np.ndarray] = []
    for row in iter_shard(path, columns=["id", "mask"]):
        try:
            histograms.append(count_labels(decode_mask(row["mask"])))
        except (OSError, ValueError, SyntaxError) as error:
            raise DatasetError(f"{path}: mask of {row['id']!r} does not decode ({error})") from None
        ids.append(row["id"])
    if not histograms:
        return SplitCounts.zeros(num_classes)
    stacked = np.stack(histograms)
    invalid = stacked[:, num_classes:IGNORE_INDEX].sum(axis=1) > 0
    if invalid.any():
        bad = ids[int(np.argmax(invalid))]
        raise DatasetError(
            f"{path}: mask of {bad!r} holds values outside 0..{num_classes - 1} and 255; "
            "re-run the ingest stage"
        )
    return SplitCounts.from_histograms(stacked, num_classes)


def count_classes(
    data: str | Path,
    workers: int = 0,
    *,
    on_shard: Callable[[str, Path, int], None] | None = None,
    mapper: ShardMapper = map_shards,
) -> DatasetCounts:
    """Count every split of the ingested dataset at ``data``, shards in parallel.

    ``workers``: processes (0 = all cores). ``on_shard(split, path, images)``
    is called as each shard is merged. Memory is bounded by one shard per
    worker, whatever the dataset size. ``mapper`` runs the shard calls (see
    :mod:`fcn_pipeline.parallel`).
    """
    data = Path(data)
    meta = read_dataset_meta(data)
    jobs = [(split, path) for split in meta.splits for path in shard_paths(data, split, meta)]
    k = meta.num_classes
    totals = {split: SplitCounts.zeros(k) for split in meta.splits}
    results = mapper(count_shard, [(path, k) for _, path in jobs], workers)
    for (split, path), counts in zip(jobs, results, strict=True):
        totals[split] = totals[split] + counts
        if on_shard:
            on_shard(split, path, counts.images)
    return DatasetCounts(data, meta, totals)


# --- class weights ------------------------------------------------------------


def all_class_weights(counts: SplitCounts, class_names: list[str]) -> dict[str, list[float]]:
    """Weights of every scheme, ``{scheme: [w_0, ..., w_{K-1}]}`` in class order.

    Warns (:class:`AbsentClassWarning`) once per class absent from ``counts``.
    """
    for index in np.flatnonzero(~counts.present):
        warnings.warn(
            f"class {class_names[index]!r} (index {index}) has no labelled pixel in the "
            f"{WEIGHTS_SPLIT} split; its weight is 0 in every computed weighting scheme "
            "(1 in 'none')",
            AbsentClassWarning,
            stacklevel=2,
        )
    return {
        scheme: scheme_weights(scheme, counts.pixels, counts.image_pixels_with_class).tolist()
        for scheme in SCHEMES
    }


# --- outputs ------------------------------------------------------------------


@dataclass(frozen=True)
class StatsResult:
    out: Path
    counts: DatasetCounts
    weights: dict[str, list[float]]
    absent_classes: list[str]
    seconds: float


def _write_frequency_tables(counts: DatasetCounts, directory: Path) -> None:
    """One CSV per split (class, split, share, ...): what ``dvc plots`` draws."""
    directory.mkdir()
    for split, split_counts in counts.splits.items():
        with open(directory / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "split", "share", "pixels", "images", "frequency"])
            for name, share, pixels, images, freq in zip(
                counts.class_names,
                split_counts.pixel_share,
                split_counts.pixels,
                split_counts.images_with_class,
                split_counts.frequency,
                strict=True,
            ):
                writer.writerow([name, split, f"{share:.6g}", pixels, images, f"{freq:.6g}"])


def _plot_frequency(counts: DatasetCounts, path: Path) -> None:
    """Grouped horizontal bars: pixel share of each class, one bar per split."""
    # The Figure API with the Agg canvas never touches pyplot's global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = counts.class_names
    splits = list(counts.splits)
    figure = Figure(figsize=(7, 1.2 + 0.45 * len(names) * max(1, len(splits)) / 2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    height = 0.8 / max(1, len(splits))
    positions = np.arange(len(names))
    for i, split in enumerate(splits):
        axes.barh(
            positions + (i - (len(splits) - 1) / 2) * height,
            counts.splits[split].pixel_share,
            height=height,
            label=split,
        )
    axes.set_yticks(positions, names)
    axes.invert_yaxis()
    axes.set_xlabel("share of labelled pixels")
    axes.set_title(f"Class pixel share ({counts.meta.source.get('format', 'dataset')})")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def stats_summary(counts: DatasetCounts, weights: dict[str, list[float]]) -> dict[str, Any]:
    """The content of ``stats.json`` (plain JSON types)."""
    train = counts.splits.get(WEIGHTS_SPLIT)
    return {
        "data": str(counts.data),
        "class_names": counts.class_names,
        "num_classes": counts.meta.num_classes,
        "ignore_index": IGNORE_INDEX,
        "splits": {split: c.to_json() for split, c in counts.splits.items()},
        "weights_split": WEIGHTS_SPLIT,
        "absent_classes": [counts.class_names[i] for i in np.flatnonzero(~train.present)],
        "weights": weights,
    }


def write_stats(counts: DatasetCounts, out: str | Path) -> StatsResult:
    """Compute the class weights and write the stats directory ``out`` atomically.

    Writes ``stats.json`` (see :func:`stats_summary`), ``class_frequency/<split>.csv``
    and ``class_frequency.png``. Raises :class:`DatasetError` when the dataset
    has no train split (the weights are computed on it).
    """
    start = time.perf_counter()
    out = Path(out)
    if WEIGHTS_SPLIT not in counts.splits:
        raise DatasetError(
            f"{counts.data}: no {WEIGHTS_SPLIT!r} split (has {sorted(counts.splits)}); "
            "class weights are computed on it"
        )
    weights = all_class_weights(counts.splits[WEIGHTS_SPLIT], counts.class_names)
    summary = stats_summary(counts, weights)
    with atomic_output_dir(out) as tmp:
        write_json(tmp / STATS_FILE, summary)
        _write_frequency_tables(counts, tmp / FREQUENCY_DIR)
        _plot_frequency(counts, tmp / FREQUENCY_PNG)
    return StatsResult(out, counts, weights, summary["absent_classes"], time.perf_counter() - start)


__all__ = [
    "AbsentClassWarning",
    "DatasetCounts",
    "SplitCounts",
    "StatsResult",
    "all_class_weights",
    "count_classes",
    "count_shard",
    "stats_summary",
    "write_stats",
]
