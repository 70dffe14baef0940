"""Evaluating a trained FCN with the paper's metrics, at native resolution.

Each image of the chosen split is predicted at its own size (batches hold only
images of one size, nothing is resized or padded), the confusion histogram is
accumulated over all non-ignored pixels, and :func:`segmentation_scores` turns
it into pixel accuracy, mean accuracy, mean IU and frequency-weighted IU.

Outputs of one variant:

- ``<metrics>/<variant>.json``: the four scores, per-class IU and accuracy, and
  what was evaluated (split, images, pixels).
- ``<out>/<variant>/confusion.csv``: the row-normalised K x K confusion matrix
  as K * K rows ``actual,predicted,share,pixels`` (one row per cell, never one
  per pixel), which DVC draws as a heatmap with ``.dvc/plots/confusion_share.json``.
- ``<out>/<variant>/confusion.png``: the same matrix drawn with matplotlib.
- ``<out>/<variant>/overlays/NN-<id>.png``: image | ground truth | prediction for
  ``evaluate.overlays`` images evenly spaced over the split (always the same ones).

Everything is written atomically; a failure leaves earlier outputs intact.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fcn_pipeline import distributed
from fcn_pipeline.atomic import atomic_output_dir, atomic_write_json
from fcn_pipeline.checkpoints import MODEL_FILE, load_model
from fcn_pipeline.config import EvaluateParams, check_staged_variant
from fcn_pipeline.data import IMAGENET_MEAN, IMAGENET_STD, SegmentationDataset, eval_loader
from fcn_pipeline.metrics import segmentation_scores
from fcn_pipeline.runtime import predict_batches, resolve_device, torch_threads

IGNORE_COLOR = (255, 255, 255)


def predict_and_count(
    model: nn.Module,
    dataset: SegmentationDataset,
    *,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
    keep: set[int] | None = None,
    per_image: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[int, np.ndarray]]:
    """The ``(K, K)`` int64 confusion histogram over ``dataset`` and the ``(H, W)`` uint8
    predictions of the images whose index is in ``keep`` (``per_image``: see
    :func:`fcn_pipeline.runtime.predict_batches`).

    Inside a process group of several ranks each predicts its share of the batches
    (none twice) and every rank gets the summed histogram and all kept predictions."""
    model.eval().to(device, memory_format=torch.channels_last)
    world = distributed.world_of_group()
    loader = eval_loader(
        dataset,
        batch_size,
        workers=workers,
        pin_memory=device.type == "cuda",
        rank=world.rank,
        world_size=world.size,
    )
    hist, kept = predict_batches(
        model, loader, dataset.num_classes, device, keep or frozenset(), per_image
    )
    if per_image is not None:
        per_image.update(distributed.merge_from_all(dict(per_image)))
    return distributed.all_reduce_sum(hist), distributed.merge_from_all(kept)


def large_object_scores(
    per_image: np.ndarray, class_names: list[str], share: float
) -> dict[str, Any]:
    """Scores of the "large object" images alone, from ``(N, K, K)`` per-image histograms.

    An image counts when one class other than ``background`` covers at least
    ``share`` of its labelled (non-ignored) pixels; that class is its dominant
    class. Returns ``images`` (how many), ``mean_iu`` (the FCN mean IU of their
    summed histogram) and ``dominant_class_iu`` (each image's IU of its dominant
    class, averaged over the images); both NaN without such images.
    """
    hists = np.asarray(per_image, dtype=np.float64).reshape(-1, len(class_names), len(class_names))
    truth = hists.sum(axis=2)  # (N, K) labelled pixels per class
    labelled = truth.sum(axis=1)
    candidates = truth.copy()
    # The background never makes an image a large-object one (void is ignored already).
    candidates[:, [i for i, n in enumerate(class_names) if n.lower() == "background"]] = -1.0
    dominant = candidates.argmax(axis=1)
    rows = np.arange(len(hists))
    chosen = (labelled > 0) & (candidates[rows, dominant] >= share * labelled)
    if not chosen.any():
        return {"images": 0, "mean_iu": math.nan, "dominant_class_iu": math.nan}
    subset, cls = hists[chosen], dominant[chosen]
    picked = np.arange(len(subset))
    hit = subset[picked, cls, cls]
    union = subset[picked, cls, :].sum(axis=1) + subset[picked, :, cls].sum(axis=1) - hit
    return {
        "images": int(chosen.sum()),
        "mean_iu": float(segmentation_scores(subset.sum(axis=0))["mean_iu"]),
        "dominant_class_iu": float((hit / union).mean()),  # union >= the class's pixels > 0
    }


def overlay_indices(count: int, images: int) -> list[int]:
    """``count`` image indices evenly spaced over ``images`` (deterministic, distinct)."""
    if count <= 0 or images <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, images - 1, min(count, images)).round()})


def colorize(mask: np.ndarray, colors: list[list[int]]) -> np.ndarray:
    """``(H, W)`` uint8 class ids -> ``(H, W, 3)`` uint8 RGB (ignore in white)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:] = IGNORE_COLOR
    palette[: len(colors)] = np.asarray(colors, dtype=np.uint8)
    return palette[mask]


def denormalize(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` normalised float32 -> ``(H, W, 3)`` uint8 RGB."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return rgb.permute(1, 2, 0).numpy()


def overlay_png(
    image: np.ndarray, truth: np.ndarray, pred: np.ndarray, colors: list[list[int]]
) -> bytes:
    """PNG of image | ground truth blended on the image | prediction blended on the image."""
    from PIL import Image

    def blend(mask: np.ndarray) -> np.ndarray:
        return (0.4 * image + 0.6 * colorize(mask, colors)).round().astype(np.uint8)

    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    row = np.concatenate([image, gap, blend(truth), gap, blend(pred)], axis=1)
    buffer = io.BytesIO()
    Image.fromarray(row).save(buffer, format="PNG")
    return buffer.getvalue()


def row_normalized(hist: torch.Tensor) -> np.ndarray:
    """``(K, K)`` float64 shares per ground-truth row (rows without pixels stay 0)."""
    counts = hist.to(torch.float64).numpy()
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def write_confusion_csv(path: Path, hist: torch.Tensor, class_names: list[str]) -> None:
    """K * K rows ``actual,predicted,share,pixels`` (share normalised per actual class)."""
    shares = row_normalized(hist)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted", "share", "pixels"])
        for i, actual in enumerate(class_names):
            for j, predicted in enumerate(class_names):
                writer.writerow([actual, predicted, f"{shares[i, j]:.6f}", int(hist[i, j])])


def write_confusion_png(path: Path, hist: torch.Tensor, class_names: list[str], title: str) -> None:
    """A row-normalised confusion matrix heatmap with the share in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = row_normalized(hist)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * k, 0.8 + 0.6 * k), dpi=100)
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    for i in range(k):
        for j in range(k):
            color = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def json_safe(value: Any) -> Any:
    """``value`` with every NaN float replaced by ``None`` (strict JSON for DVC)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


@dataclass
class EvaluationResult:
    variant: str
    metrics: dict[str, Any]
    metrics_path: Path
    out: Path
    seconds: float


def write_plots(
    out: Path, hist: torch.Tensor, title: str, dataset: SegmentationDataset,
    predictions: dict[int, np.ndarray],
) -> None:  # fmt: skip
    """``out``, atomically: the confusion matrix (``confusion.csv``, ``confusion.png``
    titled ``title``) and ``overlays/<n>-<id>.png`` of the ``predictions`` of those
    images of ``dataset``, in index order."""
    meta = dataset.meta
    with atomic_output_dir(out) as tmp:
        write_confusion_csv(tmp / "confusion.csv", hist, meta.class_names)
        write_confusion_png(tmp / "confusion.png", hist, meta.class_names, title)
        overlays = tmp / "overlays"
        overlays.mkdir()
        for number, index in enumerate(sorted(predictions)):
            sample = dataset[index]
            mask = sample.mask.numpy().astype(np.uint8)  # ignore stays 255 (white)
            png = overlay_png(
                denormalize(sample.image), mask, predictions[index], meta.class_colors
            )
            (overlays / f"{number:02d}-{sample.id}.png").write_bytes(png)


def evaluate_variant(
    params: EvaluateParams, variant: str, *, log: Callable[[str], None] = print
) -> EvaluationResult:
    """Evaluate ``<models>/<variant>/model.pt`` on ``params.split`` of ``params.data``.

    Raises :class:`ConfigError` for an unknown variant, :class:`DatasetError` for a
    missing dataset or split, :class:`CheckpointError` for a missing or corrupt model
    or one trained on other classes; nothing is written then.
    """
    check_staged_variant(variant)
    start = time.perf_counter()
    dataset = SegmentationDataset(params.data, params.split)
    meta = dataset.meta
    model_path = Path(params.models) / variant / MODEL_FILE
    model = load_model(model_path, meta.class_names)
    device = resolve_device(params.device)
    chosen = overlay_indices(params.overlays, len(dataset))
    per_image: dict[int, torch.Tensor] = {}
    with torch_threads(params.threads):
        hist, predictions = predict_and_count(
            model,
            dataset,
            batch_size=params.batch_size,
            device=device,
            workers=params.workers,
            keep=set(chosen),
            per_image=per_image,
        )
    scores = segmentation_scores(hist)
    stacked = torch.stack([per_image[i] for i in sorted(per_image)]) if per_image else None
    k = len(meta.class_names)
    large = large_object_scores(
        stacked.numpy() if stacked is not None else np.zeros((0, k, k)),
        meta.class_names,
        params.large_object_share,
    )
    metrics: dict[str, Any] = {
        "pixel_acc": scores["pixel_acc"],
        "mean_acc": scores["mean_acc"],
        "mean_iu": scores["mean_iu"],
        "fw_iu": scores["fw_iu"],
        "per_class_iu": dict(zip(meta.class_names, scores["per_class_iu"], strict=True)),
        "per_class_acc": dict(zip(meta.class_names, scores["per_class_acc"], strict=True)),
        "large_object": {**large, "share": params.large_object_share},
        "split": params.split,
        "images": len(dataset),
        "pixels": int(hist.sum()),
        "model": model.variant,
    }

    out = Path(params.out) / variant
    title = f"{model.variant} on {params.split}: mean IU {scores['mean_iu']:.3f}"
    write_plots(out, hist, title, dataset, {index: predictions[index] for index in chosen})
    metrics_path = Path(params.metrics) / f"{variant}.json"
    atomic_write_json(metrics_path, json_safe(metrics))
    seconds = time.perf_counter() - start
    log(
        f"{variant} on {params.split} ({len(dataset)} images): pixel acc "
        f"{metrics['pixel_acc']:.4f}, mean acc {metrics['mean_acc']:.4f}, mean IU "
        f"{metrics['mean_iu']:.4f}, f.w. IU {metrics['fw_iu']:.4f} ({seconds:.1f} s)"
    )
    return EvaluationResult(variant, metrics, metrics_path, out, seconds)


__all__ = [
    "EvaluationResult",
    "colorize",
    "evaluate_variant",
    "json_safe",
    "large_object_scores",
    "overlay_indices",
    "overlay_png",
    "predict_and_count",
    "row_normalized",
    "write_confusion_csv",
    "write_confusion_png",
]
