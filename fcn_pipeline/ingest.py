"""The ingest stage: any source -> validated, sharded Parquet + ``dataset.json``.

Every pair is decoded exactly once, in a worker process, where it is checked
(both files decode, same size, mask values are classes or 255), optionally
shrunk by ``data.scale`` (the image with an area or bilinear filter, the mask
with nearest neighbours so it keeps class indices), the mask is re-encoded in
the canonical convention and the shard is written. Problems from
all pairs are gathered and reported together; on any problem nothing is
written and the previous output stays in place.
"""

from __future__ import annotations

import io
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from fcn_pipeline.atomic import atomic_output_dir, write_json
from fcn_pipeline.errors import InvalidInputError
from fcn_pipeline.parallel import ShardMapper, map_shards
from fcn_pipeline.sources import PairError, PairRef, Source, open_source
from fcn_pipeline.sources.files import DECODE_ERRORS, decode_failure
from fcn_pipeline.store import (
    IGNORE_INDEX,
    META_FILE,
    SPLITS,
    DatasetMeta,
    ShardInfo,
    encode_png,
    write_shard,
)

if TYPE_CHECKING:  # worker processes import this module; keep pydantic out of their start-up
    from fcn_pipeline.config import DataParams

PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


@dataclass(frozen=True)
class ShardJob:
    split: str
    number: int
    pairs: tuple[PairRef, ...]

    @property
    def relpath(self) -> str:
        return f"{self.split}/shard-{self.number:05d}.parquet"


@dataclass(frozen=True)
class IngestResult:
    out: Path
    meta: DatasetMeta
    seconds: float

    @property
    def images(self) -> int:
        return sum(self.meta.split_images(s) for s in self.meta.splits)


# PIL's filters: BOX averages the input area each output pixel covers (area
# interpolation); BILINEAR is a triangle filter whose support widens with the
# shrink factor (antialiased); NEAREST samples the input at each output pixel's centre.
RESAMPLE = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR}


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """``(height, width)`` times ``scale``, halves rounded up, at least one pixel each."""
    return max(1, math.floor(height * scale + 0.5)), max(1, math.floor(width * scale + 0.5))


def _decode_checked(
    path: str, data: bytes, scale: float = 1.0, resample: str = "area"
) -> tuple[int, int, bytes]:
    """Decode the image once: return its (height, width) as read and the bytes to store.

    Unscaled PNG and JPEG bytes are kept unchanged; other formats, and every image
    shrunk by ``scale`` < 1, are (re-)encoded as PNG.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
            if scale != 1.0:
                size = scaled_size(height, width, scale)[::-1]  # PIL: (width, height)
                rgb = image.convert("RGB").resize(size, RESAMPLE[resample])
                return height, width, encode_png(np.asarray(rgb))
            if data.startswith((PNG_MAGIC, JPEG_MAGIC)):
                return height, width, data
            return height, width, encode_png(np.asarray(image.convert("RGB")))
    except DECODE_ERRORS as error:
        raise PairError(path, f"image does not decode: {decode_failure(data, error)}") from None


def _encode_pair(
    source: Source, pair: PairRef, num_classes: int, scale: float = 1.0, resample: str = "area"
) -> dict:
    image_bytes, mask = source.load(pair)
    height, width, image_bytes = _decode_checked(
        pair.image or pair.id, image_bytes, scale, resample
    )
    mask_name = pair.mask or pair.id
    if mask.shape != (height, width):
        raise PairError(
            mask_name, f"mask is {mask.shape[0]}x{mask.shape[1]}, image is {height}x{width}"
        )
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        values = np.unique(mask[bad]).tolist()
        raise PairError(
            mask_name, f"mask values {values} are neither a class (0..{num_classes - 1}) nor 255"
        )
    if scale != 1.0:
        height, width = scaled_size(height, width, scale)
        nearest = Image.Resampling.NEAREST
        mask = np.asarray(Image.fromarray(mask).resize((width, height), nearest))
    return {
        "id": pair.id,
        "split": pair.split,
        "height": height,
        "width": width,
        "image": image_bytes,
        "mask": encode_png(mask),
    }


def ingest_shard(
    source: Source,
    job: ShardJob,
    num_classes: int,
    out_dir: Path,
    scale: float = 1.0,
    resample: str = "area",
) -> tuple[int, list[tuple[str, str]]]:
    """Validate, scale and encode the pairs of one shard and write it under ``out_dir``.

    Returns ``(rows written, problems)``; runs in a worker process.
    """
    rows, problems = [], []
    for pair in job.pairs:
        try:
            rows.append(_encode_pair(source, pair, num_classes, scale, resample))
        except PairError as error:
            problems.append((error.path, error.reason))
    if not problems:
        write_shard(out_dir / job.relpath, rows)
    return len(rows), problems


def plan_shards(pairs: list[PairRef], shard_size: int) -> list[ShardJob]:
    """Group pairs by split (in id order) into shards of at most ``shard_size``."""
    jobs = []
    for split in SPLITS:
        members = sorted((p for p in pairs if p.split == split), key=lambda p: p.id)
        for number, start in enumerate(range(0, len(members), shard_size)):
            jobs.append(ShardJob(split, number, tuple(members[start : start + shard_size])))
    return jobs


def _undecodable_names(pairs: list[PairRef]) -> list[tuple[str, str]]:
    """Pairs whose id (a file name) is not valid UTF-8: Parquet strings must be."""
    problems = []
    for pair in pairs:
        try:
            pair.id.encode("utf-8")
        except UnicodeEncodeError:
            problems.append((pair.image or pair.id, "file name is not valid UTF-8; rename it"))
    return problems


def _duplicate_ids(pairs: list[PairRef]) -> list[tuple[str, str]]:
    counts = Counter(p.id for p in pairs)
    return [
        (p.image or p.id, f"duplicate id {p.id!r} ({counts[p.id]} pairs share it)")
        for p in pairs
        if counts[p.id] > 1
    ]


def ingest(
    params: DataParams,
    out: str | Path | None = None,
    *,
    on_shard: Callable[[ShardJob, int], None] | None = None,
    mapper: ShardMapper = map_shards,
) -> IngestResult:
    """Read the dataset described by ``params`` and write it to ``out`` atomically.

    ``mapper`` runs the shard calls (see :mod:`fcn_pipeline.parallel`); the
    output does not depend on which one.
    Raises :class:`InvalidInputError` listing every offending file (and writes
    nothing) when any pair fails validation.
    """
    start = time.perf_counter()
    out = Path(out or params.out)
    source = open_source(params)
    listing = source.scan()
    problems = list(listing.problems) + _duplicate_ids(listing.pairs)
    bad_names = _undecodable_names(listing.pairs)
    if bad_names:  # such a pair cannot be stored: report it with the rest, do not encode it
        problems += bad_names
        named = {path for path, _ in bad_names}
        listing.pairs = [p for p in listing.pairs if (p.image or p.id) not in named]
    jobs = plan_shards(listing.pairs, params.shard_size)
    num_classes = len(listing.class_names)
    shards: dict[str, list[ShardInfo]] = {}
    with atomic_output_dir(out) as tmp:
        calls = [(source, job, num_classes, tmp, params.scale, params.resample) for job in jobs]
        results = mapper(ingest_shard, calls, params.workers)
        for job, (count, shard_problems) in zip(jobs, results, strict=True):
            problems += shard_problems
            shards.setdefault(job.split, []).append(ShardInfo(job.relpath, count))
            if on_shard:
                on_shard(job, count)
        if problems:
            raise InvalidInputError(f"{params.root or params.format}: dataset is invalid", problems)
        source_info = dict(listing.description)
        if params.root:
            source_info["root"] = params.root
        if params.scale != 1.0:  # recorded only when used: unscaled datasets stay as they were
            source_info.update(scale=params.scale, resample=params.resample)
        meta = DatasetMeta(
            source=source_info,
            class_names=listing.class_names,
            class_colors=listing.class_colors,
            ignore_index=IGNORE_INDEX,
            splits=shards,
        )
        write_json(tmp / META_FILE, meta.to_json())
    return IngestResult(out, meta, time.perf_counter() - start)
