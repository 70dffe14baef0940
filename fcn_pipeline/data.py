"""PyTorch datasets and loaders over the ingested Parquet shards.

An ingested dataset (or a patch set from the patches stage, which has the same
layout with a single ``train`` split) is indexed once: one ``(shard, row)`` pair
per image. Images are decoded lazily in ``__getitem__``, so the DataLoader's
worker processes are the ones that read the shards and decode the PNG/JPEG
bytes; each process keeps the shards it has opened memory-mapped (shards are
written without Parquet compression, so a row is read without a copy of the
whole file).

Images of different sizes are batched by padding (:func:`pad_collate`): the
image with zeros after normalisation (the mean colour) and the mask with the
ignore label 255, so padded pixels never enter the loss or the metrics.
Evaluation batches only images of the same size (:class:`SameSizeBatchSampler`),
so every image is predicted at its native size with no padding at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fcn_pipeline.errors import DatasetError
from fcn_pipeline.store import (
    IGNORE_INDEX,
    DatasetMeta,
    decode_image,
    decode_mask,
    read_dataset_meta,
    shard_paths,
)

# ImageNet statistics: a pretrained VGG16 expects inputs normalised with them, and a
# net trained from scratch does not mind.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Shards opened by this process (a DataLoader worker or the main process).
_OPEN_SHARDS: dict[str, pa.Table] = {}


def _shard_table(path: str) -> pa.Table:
    table = _OPEN_SHARDS.get(path)
    if table is None:
        try:
            table = pq.read_table(path, columns=["id", "image", "mask"], memory_map=True)
        except (OSError, pa.ArrowInvalid) as error:
            raise DatasetError(f"{path}: cannot read Parquet shard: {error}") from None
        _OPEN_SHARDS[path] = table
    return table


def normalize_image(
    image: np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(3, H, W)`` float32 normalised with ``mean`` and
    ``std`` (default ImageNet's, what training uses)."""
    tensor = (
        torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
        .permute(2, 0, 1)
        .float()
        .div_(255.0)
    )
    return tensor.sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))


@dataclass(frozen=True)
class Sample:
    """One decoded image: ``image`` (3, H, W) float32, ``mask`` (H, W) int64, its ``id``."""

    image: torch.Tensor
    mask: torch.Tensor
    id: str


class SegmentationDataset(Dataset):
    """The images of one split of an ingested dataset (or patch set).

    ``dataset[i]`` is a :class:`Sample`: the normalised ``(3, H, W)`` float32 image,
    the ``(H, W)`` int64 mask (class ids, 255 = ignore) and the image id. Images are
    in shard order, i.e. the order the ingest stage wrote them.

    Raises :class:`DatasetError` naming the path if the dataset, the split or a
    shard is missing or unreadable.
    """

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        self.split = split
        self.meta: DatasetMeta = read_dataset_meta(self.root)
        self.shards = [str(path) for path in shard_paths(self.root, split, self.meta)]
        index: list[tuple[int, int]] = []
        sizes: list[tuple[int, int]] = []
        for shard_number, path in enumerate(self.shards):
            try:
                table = pq.read_table(path, columns=["height", "width"])
            except (OSError, pa.ArrowInvalid, KeyError) as error:
                raise DatasetError(f"{path}: cannot read Parquet shard: {error}") from None
            heights = table.column("height").to_pylist()
            widths = table.column("width").to_pylist()
            index += [(shard_number, row) for row in range(len(heights))]
            sizes += list(zip(heights, widths, strict=True))
        if not index:
            raise DatasetError(f"{self.root}: split {split!r} has no images")
        self.index = index
        self.sizes = sizes  # (height, width) per image, without decoding anything

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    def __len__(self) -> int:
        return len(self.index)

    def decoded(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        """Image ``i`` as stored: ``(H, W, 3)`` uint8 RGB, ``(H, W)`` uint8 mask, id."""
        shard_number, row = self.index[i]
        path = self.shards[shard_number]
        table = _shard_table(path)
        try:
            image = decode_image(table.column("image")[row].as_py())
            mask = decode_mask(table.column("mask")[row].as_py())
        except (OSError, ValueError) as error:
            raise DatasetError(f"{path}: row {row} does not decode: {error}") from None
        if image.shape[:2] != mask.shape:
            raise DatasetError(
                f"{path}: row {row} has image {image.shape[:2]} but mask {mask.shape}"
            )
        return image, mask, str(table.column("id")[row].as_py())

    def decoded_bytes(self) -> int:
        """Memory the decoded split takes: 3 bytes of image and 1 of mask per pixel."""
        return sum(4 * height * width for height, width in self.sizes)

    def __getitem__(self, i: int) -> Sample:
        return to_sample(*self.decoded(i))


def to_sample(image: np.ndarray, mask: np.ndarray, sample_id: str) -> Sample:
    """A decoded image and mask as the tensors a net and the loss take."""
    return Sample(
        image=normalize_image(image),
        mask=torch.from_numpy(mask.astype(np.int64)),
        id=sample_id,
    )


class PreloadedDataset(Dataset):
    """A :class:`SegmentationDataset` decoded once into memory (uint8, as stored):
    ``dataset[i]`` is the same :class:`Sample` as the streaming dataset's, without
    decoding a PNG again in every epoch. Loaders over it need no worker processes."""

    def __init__(self, dataset: SegmentationDataset):
        self.root, self.split, self.meta = dataset.root, dataset.split, dataset.meta
        self.sizes = dataset.sizes
        self.items = [dataset.decoded(i) for i in range(len(dataset))]
        _OPEN_SHARDS.clear()  # the decoded copy replaces the memory-mapped shards

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        return to_sample(*self.items[i])


def preload(dataset: SegmentationDataset, limit_mb: int) -> SegmentationDataset | PreloadedDataset:
    """``dataset`` decoded into memory when it takes at most ``limit_mb`` MiB decoded,
    else ``dataset`` itself (streamed from the shards by loader processes)."""
    if dataset.decoded_bytes() > limit_mb * 2**20:
        return dataset
    return PreloadedDataset(dataset)


@dataclass(frozen=True)
class Batch:
    """``images`` (N, 3, H, W) float32, ``masks`` (N, H, W) int64, ``ids`` (N strings),
    ``sizes`` (N (height, width) pairs before padding)."""

    images: torch.Tensor
    masks: torch.Tensor
    ids: list[str]
    sizes: list[tuple[int, int]]

    def pin_memory(self) -> Batch:
        return Batch(self.images.pin_memory(), self.masks.pin_memory(), self.ids, self.sizes)


def pad_collate(samples: Sequence[Sample], ignore_index: int = IGNORE_INDEX) -> Batch:
    """Stack samples into a :class:`Batch`, padding to the largest height and width.

    Padding goes to the bottom and right: images with 0 (the mean colour after
    normalisation), masks with ``ignore_index`` so padded pixels count nowhere.
    """
    height = max(sample.image.shape[1] for sample in samples)
    width = max(sample.image.shape[2] for sample in samples)
    images = torch.zeros((len(samples), 3, height, width), dtype=torch.float32)
    masks = torch.full((len(samples), height, width), ignore_index, dtype=torch.int64)
    for i, sample in enumerate(samples):
        h, w = sample.mask.shape
        images[i, :, :h, :w] = sample.image
        masks[i, :h, :w] = sample.mask
    return Batch(
        images=images,
        masks=masks,
        ids=[sample.id for sample in samples],
        sizes=[tuple(sample.mask.shape) for sample in samples],
    )


class SameSizeBatchSampler(Sampler[list[int]]):
    """Batches of at most ``batch_size`` indices whose images share one size.

    Groups keep the dataset order (first appearance of each size), so the batches
    are deterministic; nothing is padded when the batches are collated.

    With ``rank`` and ``world_size``, only this process's share: batches ``rank``,
    ``rank + world_size``, ... (no batch is padded or repeated, so the confusion
    histograms of the shares sum to the whole split's exactly).
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(tuple(size), []).append(i)
        self.batches = [
            indices[start : start + batch_size]
            for indices in groups.values()
            for start in range(0, len(indices), batch_size)
        ][rank::world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class RankBatchSampler(Sampler[list[int]]):
    """This process's share of the shuffled global batches of one epoch.

    The global batches are exactly those a one-process :func:`train_loader` with the
    same ``seed`` and ``batch_size`` draws (the same DataLoader shuffle is replayed
    over the indices), and rank ``r`` of ``world_size`` takes the ``r``-th slice of
    ``batch_size // world_size`` indices of each. So N processes step on the same
    images as one process, and a new ``seed`` per epoch reshuffles. Incomplete last
    batches are dropped, so every rank takes the same number of steps.
    """

    def __init__(self, length: int, batch_size: int, *, seed: int, rank: int, world_size: int):
        share = batch_size // world_size
        order = DataLoader(
            range(length),
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            drop_last=True,
        )
        self.batches = [batch[rank * share : (rank + 1) * share].tolist() for batch in order]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _seed_worker(worker_id: int) -> None:
    # Each worker's torch seed derives from the loader's generator; numpy follows it.
    np.random.seed(torch.initial_seed() % 2**32)


def loader_workers(workers: int) -> int:
    """``workers`` DataLoader processes; ``-1`` = one per CPU core minus one (at least 0)."""
    if workers >= 0:
        return workers
    return max(0, (torch.get_num_threads() or 1) - 1)


def train_loader(
    dataset: SegmentationDataset,
    batch_size: int,
    *,
    seed: int,
    workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A shuffling loader whose order depends only on ``seed`` (padded batches).

    With ``world_size`` > 1, ``batch_size`` is the global batch: this process gets
    ``batch_size // world_size`` images of each (:class:`RankBatchSampler`, always
    dropping the incomplete last batch)."""
    generator = torch.Generator().manual_seed(seed)
    workers = loader_workers(workers)
    if world_size > 1:
        sampler = RankBatchSampler(
            len(dataset), batch_size, seed=seed, rank=rank, world_size=world_size
        )
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            generator=generator,  # seeds the workers as the one-process loader does
            num_workers=workers,
            collate_fn=pad_collate,
            pin_memory=pin_memory,
            worker_init_fn=_seed_worker,
            prefetch_factor=4 if workers else None,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        num_workers=workers,
        collate_fn=pad_collate,
        pin_memory=pin_memory,
        drop_last=drop_last and len(dataset) >= batch_size,
        worker_init_fn=_seed_worker,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def eval_loader(
    dataset: SegmentationDataset,
    batch_size: int,
    *,
    workers: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A loader in dataset order that batches same-size images only (native resolution);
    with ``world_size`` > 1 only this rank's share of the batches, none repeated."""
    workers = loader_workers(workers)
    return DataLoader(
        dataset,
        batch_sampler=SameSizeBatchSampler(dataset.sizes, batch_size, rank, world_size),
        num_workers=workers,
        collate_fn=pad_collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
    )


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Batch",
    "PreloadedDataset",
    "RankBatchSampler",
    "SameSizeBatchSampler",
    "Sample",
    "SegmentationDataset",
    "eval_loader",
    "loader_workers",
    "normalize_image",
    "pad_collate",
    "preload",
    "to_sample",
    "train_loader",
]
