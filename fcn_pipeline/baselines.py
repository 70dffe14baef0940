"""Sanity baselines for a dataset: what can be learned without looking at context.

``colour_classifier_scores`` fits a per-pixel multinomial logistic regression on
RGB alone and scores it with the FCN metrics. A dataset on which it does well
is a colour-lookup toy, not a segmentation problem; the synthetic default is
built so that it does badly.

``stride_ceiling_scores`` measures the other end: the best an FCN whose scores
come at a given output stride (32, 16, 8) can do on a split, however well
trained, because its bilinear upsampling cannot draw finer boundaries.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fcn_pipeline.metrics import confusion_matrix, segmentation_scores
from fcn_pipeline.store import (
    IGNORE_INDEX,
    decode_image,
    decode_mask,
    iter_shard,
    read_dataset_meta,
    shard_paths,
)


def _pixels(dataset: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All labelled pixels of ``split``: ``(P, 3)`` float32 RGB in [0, 1], ``(P,)`` int64."""
    colours, labels = [], []
    meta = read_dataset_meta(dataset)
    for path in shard_paths(dataset, split, meta):
        for row in iter_shard(path, columns=["image", "mask"]):
            mask = decode_mask(row["mask"]).ravel()
            keep = mask != meta.ignore_index
            colours.append(decode_image(row["image"]).reshape(-1, 3)[keep])
            labels.append(mask[keep])
    return np.concatenate(colours).astype(np.float32) / 255, np.concatenate(labels).astype(np.int64)


def colour_classifier_scores(
    dataset: str | Path,
    *,
    train_split: str = "train",
    test_split: str = "test",
    max_train_pixels: int = 200_000,
    seed: int = 0,
) -> dict:
    """Fit softmax regression on RGB (train split), return FCN scores on the test split.

    The fit is full-batch L-BFGS on at most ``max_train_pixels`` random labelled
    train pixels, with features (R, G, B, 1). Returns the dict of
    :func:`fcn_pipeline.metrics.segmentation_scores`.
    """
    dataset = Path(dataset)
    num_classes = read_dataset_meta(dataset).num_classes
    x, y = _pixels(dataset, train_split)
    rng = np.random.default_rng(seed)
    if len(y) > max_train_pixels:
        pick = rng.choice(len(y), max_train_pixels, replace=False)
        x, y = x[pick], y[pick]
    features, target = torch.from_numpy(x), torch.from_numpy(y)
    model = torch.nn.Linear(3, num_classes)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(features), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    x_test, y_test = _pixels(dataset, test_split)
    with torch.no_grad():
        pred = model(torch.from_numpy(x_test)).argmax(dim=1)
    return segmentation_scores(confusion_matrix(pred, torch.from_numpy(y_test), num_classes))


def fitted_prediction(
    masks: torch.Tensor, num_classes: int, stride: int, *, steps: int = 300
) -> torch.Tensor:
    """Argmax of the bilinear upsampling of stride-``stride`` score maps fitted to ``masks``.

    ``masks`` is ``(N, H, W)`` int64 (255 = ignore). For each image a free score map of
    ``(K, ceil(H / stride), ceil(W / stride))`` numbers (no network) is fitted to the
    image's own labels by minimising the per-pixel cross-entropy of its bilinear
    upsampling (half-pixel centres, as FCN's bilinear deconvolution inside the map)
    with Adam. Returns the ``(N, H, W)`` argmax.
    """
    n, height, width = masks.shape
    coarse = (n, num_classes, -(-height // stride), -(-width // stride))
    scores = torch.zeros(coarse, requires_grad=True)
    optimizer = torch.optim.Adam([scores], lr=0.3)

    def upsampled() -> torch.Tensor:
        if stride == 1:
            return scores
        fine = F.interpolate(scores, scale_factor=stride, mode="bilinear", align_corners=False)
        return fine[..., :height, :width]

    for _ in range(steps):
        loss = F.cross_entropy(upsampled(), masks, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return upsampled().argmax(1)


def stride_ceiling_scores(
    dataset: str | Path,
    split: str,
    strides: Sequence[int] = (32, 16, 8),
    *,
    steps: int = 300,
    batch: int = 32,
) -> dict[int, dict]:
    """FCN metrics of :func:`fitted_prediction` over ``split`` for each of ``strides``: a
    ceiling for any FCN whose finest scores come at that output stride (FCN-8s: 8).

    Each mask is decoded once, whatever the number of strides."""
    meta = read_dataset_meta(dataset)
    k = meta.num_classes
    by_size: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
    for path in shard_paths(dataset, split, meta):
        for row in iter_shard(path, columns=["mask"]):
            mask = torch.from_numpy(decode_mask(row["mask"]).astype(np.int64))
            by_size[tuple(mask.shape)].append(mask)
    batches = [
        torch.stack(masks[start : start + batch])
        for masks in by_size.values()
        for start in range(0, len(masks), batch)
    ]
    scores = {}
    for stride in strides:
        hist = torch.zeros((k, k), dtype=torch.int64)
        for target in batches:
            prediction = fitted_prediction(target, k, stride, steps=steps)
            hist += confusion_matrix(prediction, target, k, ignore_index=IGNORE_INDEX)
        scores[stride] = segmentation_scores(hist)
    return scores
