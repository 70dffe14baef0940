"""Datasets and loaders over the Parquet shards: decoding, padding with 255, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fcn_pipeline.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SameSizeBatchSampler,
    Sample,
    SegmentationDataset,
    eval_loader,
    pad_collate,
    train_loader,
)
from fcn_pipeline.errors import DatasetError
from fcn_pipeline.store import decode_image, decode_mask, iter_shard, shard_paths


def test_dataset_decodes_every_row_of_the_split(tiny_data):
    dataset = SegmentationDataset(tiny_data / "ingested", "train")
    rows = [
        row for path in shard_paths(tiny_data / "ingested", "train") for row in iter_shard(path)
    ]
    assert len(dataset) == len(rows) == 8
    assert dataset.num_classes == 6
    for i, row in enumerate(rows):
        sample = dataset[i]
        assert sample.id == row["id"]
        assert sample.image.shape == (3, 48, 64) and sample.image.dtype == torch.float32
        assert sample.mask.dtype == torch.int64
        assert torch.equal(sample.mask, torch.from_numpy(decode_mask(row["mask"]).astype(np.int64)))
        # Normalisation is ImageNet's: undo it and get the stored pixels back.
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        rgb = (sample.image * std + mean).mul(255).round().to(torch.uint8).permute(1, 2, 0)
        assert torch.equal(rgb, torch.from_numpy(np.array(decode_image(row["image"]))))
    assert dataset.sizes == [(48, 64)] * 8


def test_patch_set_reads_as_a_train_split(tiny_data):
    patches = SegmentationDataset(tiny_data / "patches", "train")
    assert len(patches) == 8 * 4  # patches_per_image = 4
    sample = patches[0]
    assert sample.image.shape == (3, 32, 32) and sample.mask.shape == (32, 32)


def test_missing_split_or_dataset_is_a_clear_error(tiny_data, tmp_path):
    with pytest.raises(DatasetError, match="no split 'test'"):
        SegmentationDataset(tiny_data / "patches", "test")
    with pytest.raises(DatasetError, match="not found"):
        SegmentationDataset(tmp_path / "nowhere", "train")


def _sample(height: int, width: int, value: int) -> Sample:
    return Sample(
        image=torch.full((3, height, width), float(value)),
        mask=torch.full((height, width), value, dtype=torch.int64),
        id=f"img{value}",
    )


def test_pad_collate_pads_images_with_zero_and_masks_with_ignore():
    batch = pad_collate([_sample(4, 6, 1), _sample(5, 3, 2)])
    assert batch.images.shape == (2, 3, 5, 6) and batch.masks.shape == (2, 5, 6)
    assert batch.ids == ["img1", "img2"] and batch.sizes == [(4, 6), (5, 3)]
    # The originals sit top-left, unchanged.
    assert (batch.images[0, :, :4, :6] == 1).all() and (batch.masks[0, :4, :6] == 1).all()
    assert (batch.images[1, :, :5, :3] == 2).all() and (batch.masks[1, :5, :3] == 2).all()
    # Padding: zero image, ignore label.
    assert (batch.images[0, :, 4:] == 0).all() and (batch.masks[0, 4:] == 255).all()
    assert (batch.images[1, :, :, 3:] == 0).all() and (batch.masks[1, :, 3:] == 255).all()
    assert batch.masks.dtype == torch.int64


def test_same_size_batches_never_mix_sizes_and_keep_order():
    sizes = [(4, 4), (8, 8), (4, 4), (4, 4), (8, 8), (4, 4)]
    sampler = SameSizeBatchSampler(sizes, batch_size=3)
    assert list(sampler) == [[0, 2, 3], [5], [1, 4]]
    assert len(sampler) == 3
    assert sorted(i for batch in sampler for i in batch) == list(range(len(sizes)))


def test_eval_loader_covers_the_split_in_order(tiny_data):
    dataset = SegmentationDataset(tiny_data / "ingested", "val")
    ids = [i for batch in eval_loader(dataset, batch_size=3) for i in batch.ids]
    assert ids == [dataset[i].id for i in range(len(dataset))]


def test_train_loader_order_depends_only_on_the_seed(tiny_data):
    dataset = SegmentationDataset(tiny_data / "ingested", "train")

    def order(seed: int, workers: int) -> list[str]:
        loader = train_loader(dataset, batch_size=3, seed=seed, workers=workers)
        return [i for batch in loader for i in batch.ids]

    first = order(1, 0)
    assert sorted(first) == sorted(dataset[i].id for i in range(len(dataset)))
    assert order(1, 0) == first
    assert order(1, 2) == first  # worker processes read the shards, same order
    assert order(2, 0) != first
