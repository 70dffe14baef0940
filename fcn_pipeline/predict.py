"""Using a trained model on new images: class masks for files, directories and globs.

:func:`predict` reads everything it needs from the model file (``model.pt``: the
architecture, weights, class names and colours, input normalisation; or an ``.onnx``
file written by :mod:`fcn_pipeline.export`), so no ``params.yaml`` is needed. Per input
image it writes ``<out>/<relative path>.png``: the class-index mask as a palette PNG
whose palette is the classes' colours (any viewer shows colours; reading it with
:func:`fcn_pipeline.store.decode_mask` gives the indices back), and with ``overlay``
``<relative path>.overlay.jpg``: the image blended with the colours, with a legend.

Inputs are found by content (PNG, JPEG, BMP, TIFF signatures), not by extension, in
directories (recursively) and glob patterns; a file named on its own is always read, so
a non-image named explicitly is an error. Two inputs that would write one output name
are refused, naming both.

Prediction runs at native resolution like evaluation: same-size images are batched,
nothing is resized. ``tile`` (with ``overlap``) slides a window over large images and
averages the scores of overlapping windows before the argmax, one row of windows at a
time, so memory stays bounded by the window row whatever the image size. ``flip``
averages the scores of the image and of its mirror image (test-time augmentation).
Every output is written atomically: an error leaves no partial file, and an existing
output is replaced only by a complete new one.
"""

from __future__ import annotations

import glob
import io
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcn_pipeline.atomic import atomic_write_bytes
from fcn_pipeline.data import normalize_image
from fcn_pipeline.errors import PipelineError, printable
from fcn_pipeline.scorers import ModelInfo, load_scorer

# First bytes of the image formats read (PIL decodes them).
SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")


class InputError(PipelineError):
    """An input image or directory cannot be read, or two inputs collide."""


# --- inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InputImage:
    path: Path  # the file read
    name: Path  # its path relative to the input it was found under (output layout)


def is_image(path: Path) -> bool:
    """Whether ``path`` starts with the signature of a PNG, JPEG, BMP or TIFF file."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return any(head.startswith(signature) for signature in SIGNATURES)


def _walk(root: Path) -> Iterator[Path]:
    def fail(error: OSError) -> None:
        raise InputError(f"{printable(error.filename or root)}: cannot read ({error.strerror})")

    if not os.access(root, os.R_OK | os.X_OK):
        raise InputError(f"{printable(root)}: cannot read the directory (permission denied)")
    for folder, dirs, files in os.walk(root, onerror=fail):
        dirs.sort()
        for name in sorted(files):
            yield Path(folder) / name


def _glob_base(pattern: str) -> Path:
    """The directory a glob pattern's matches are named relative to: its non-magic part."""
    parts = Path(pattern).parts
    fixed = [part for part in _until_magic(parts)]
    return Path(*fixed) if fixed else Path(".")


def _until_magic(parts: Sequence[str]) -> Iterator[str]:
    for part in parts:
        if glob.has_magic(part):
            return
        yield part


def collect_inputs(inputs: Sequence[str]) -> list[InputImage]:
    """The images named by ``inputs`` (files, directories, glob patterns), in order.

    Directories and globs contribute the files that are images by content; a file
    named on its own is always taken (reading it says what is wrong). Raises
    :class:`InputError` naming the input that matches nothing or cannot be read, and
    the two inputs when two would write the same output name."""
    found: list[InputImage] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found += [InputImage(p, p.relative_to(path)) for p in _walk(path) if is_image(p)]
        elif path.is_file():
            found.append(InputImage(path, Path(path.name)))
        elif glob.has_magic(spec):
            base = _glob_base(spec)
            matches = [Path(m) for m in sorted(glob.glob(spec, recursive=True))]
            images = [m for m in matches if m.is_file() and is_image(m)]
            if not images:
                raise InputError(f"{printable(spec)}: matches no image file")
            found += [InputImage(m, m.relative_to(base)) for m in images]
        else:
            raise InputError(f"{printable(spec)}: no such file or directory")
    if not found:
        raise InputError(f"{', '.join(printable(s) for s in inputs)}: no image files found")
    owners: dict[Path, Path] = {}
    for item in found:
        out = output_name(item)
        if out in owners and owners[out] != item.path:
            raise InputError(
                f"{printable(owners[out])} and {printable(item.path)} would both write "
                f"{printable(out)}; predict them into different --out directories"
            )
        owners[out] = item.path
    unique = {item.path: item for item in found}  # one path named twice is read once
    return list(unique.values())


def output_name(item: InputImage) -> Path:
    """``<relative path>`` with ``.png`` for its extension: where the mask goes."""
    return item.name.with_suffix(".png")


def read_image(path: Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of an image file; :class:`InputError` naming it otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        raise InputError(f"{printable(path)}: not an image (PNG, JPEG, BMP or TIFF)") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated, corrupt
        raise InputError(f"{printable(path)}: corrupt or truncated image ({error})") from None


# --- predicting -----------------------------------------------------------------------


def normalize(image: np.ndarray, info: ModelInfo) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 with the model's mean and std, by
    the training data's own :func:`fcn_pipeline.data.normalize_image`."""
    return normalize_image(image, info.mean, info.std)


def scores_of(scorer: Callable, x: torch.Tensor, flip: bool) -> torch.Tensor:
    """``(N, K, H, W)`` scores of a normalised batch; ``flip``: averaged with those of
    the mirrored batch, mirrored back."""
    scores = scorer(x)
    if flip:
        scores = (scores + scorer(x.flip(-1).contiguous()).flip(-1)) / 2
    return scores


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Window starts along one axis: every ``stride`` pixels, the last flush with the
    end (a single window when ``size`` <= ``tile``)."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def edge_weights(start: int, length: int, size: int, overlap: int) -> torch.Tensor:
    """Weights of a window's pixels along one axis: 1 inside, rising linearly over
    ``overlap`` pixels from each edge that lies inside the image (an edge on the
    image's border keeps weight 1), so two windows overlapping by ``overlap`` cross-fade
    and each pixel's scores come mostly from the window it lies deepest in."""
    weight = torch.ones(length)
    if overlap <= 0:
        return weight
    ramp = (torch.arange(length, dtype=torch.float32) + 0.5) / overlap
    if start > 0:
        weight = torch.minimum(weight, ramp)
    if start + length < size:
        weight = torch.minimum(weight, ramp.flip(0))
    return weight


# VGG16's pooling grid (five 2x2 poolings): a window cut on it computes what the whole
# image computes out of its borders' reach. fc6 (7x7 on pool5) sees 404 pixels, 202 to
# each side: rounded up to the grid, the context a window needs around its pixels.
GRID, CONTEXT = 32, 224


def context_window(start: int, end: int, size: int, context: int) -> tuple[int, int]:
    """The input span ``[lo, hi)`` predicted for the output span ``[start, end)``: widened
    by ``context`` on each side, clipped to the image, ``lo`` on the pooling grid."""
    return max(0, (start - context) // GRID * GRID), min(size, end + context)


def _window_scores(
    scorer: Callable, image: torch.Tensor, boxes: list[tuple[int, int, int, int]],
    context: int, flip: bool, batch_size: int,
) -> list[torch.Tensor]:  # fmt: skip
    """Scores of each output box ``(top, bottom, left, right)``: without context the
    boxes themselves, batched; with it, each from its context window, cut back."""
    if context == 0:
        windows = [image[:, t:b, left:r] for t, b, left, r in boxes]
        return list(torch.cat(
            [scores_of(scorer, torch.stack(windows[j : j + batch_size]), flip)
             for j in range(0, len(windows), batch_size)]
        ))  # fmt: skip
    _, height, width = image.shape
    kept = []
    for top, bottom, left, right in boxes:
        y0, y1 = context_window(top, bottom, height, context)
        x0, x1 = context_window(left, right, width, context)
        scores = scores_of(scorer, image[None, :, y0:y1, x0:x1].contiguous(), flip)[0]
        kept.append(scores[:, top - y0 : bottom - y0, left - x0 : right - x0])
    return kept


def predict_tiled(
    scorer: Callable,
    image: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    context: int = CONTEXT,
    flip: bool = False,
    batch_size: int = 8,
) -> np.ndarray:
    """``(H, W)`` uint8 labels of a normalised ``(3, H, W)`` image from windows of
    ``tile`` pixels overlapping by ``overlap``: each pixel's scores are averaged over the
    windows that cover it, weighted by :func:`edge_weights`. With ``context`` (default:
    the net's reach) each window is predicted from a larger one that adds that many
    pixels around it, cut on the pooling grid, and only its own pixels are kept
    (overlap-tile): the scores are then the whole image's, up to float rounding, and
    memory is bounded by one context window. With ``context`` 0 a window sees only
    itself, and its border pixels see the least context. Scores are kept only for the
    current row of windows: memory does not grow with the image."""
    _, height, width = image.shape
    stride = tile - overlap
    rows, cols = tile_starts(height, tile, stride), tile_starts(width, tile, stride)
    labels = np.empty((height, width), dtype=np.uint8)
    band: torch.Tensor | None = None  # summed scores of rows [top, top + band height)
    top = 0
    for i, y in enumerate(rows):
        bottom = min(y + tile, height)
        boxes = [(y, bottom, x, min(x + tile, width)) for x in cols]
        scores = _window_scores(scorer, image, boxes, context, flip, batch_size)
        if band is None:
            band = torch.zeros((scores[0].shape[0], 0, width), dtype=torch.float32)
        if top + band.shape[1] < bottom:  # grow the band down to this row's bottom
            grow = bottom - top - band.shape[1]
            band = torch.cat([band, band.new_zeros((band.shape[0], grow, width))], dim=1)
        row_weight = edge_weights(y, bottom - y, height, overlap)[:, None]
        for x, window in zip(cols, scores, strict=True):
            width_here = window.shape[-1]
            weight = row_weight * edge_weights(x, width_here, width, overlap)[None, :]
            band[:, y - top : bottom - top, x : x + width_here] += window * weight
        done = (rows[i + 1] if i + 1 < len(rows) else height) - top  # rows no window adds to
        labels[top : top + done] = band[:, :done].argmax(0).to(torch.uint8).numpy()
        band, top = band[:, done:], top + done
    return labels


def predict_whole(scorer: Callable, batch: torch.Tensor, flip: bool = False) -> np.ndarray:
    """``(N, H, W)`` uint8 labels of a normalised same-size batch, at native size."""
    return scores_of(scorer, batch, flip).argmax(1).to(torch.uint8).numpy()


# --- writing --------------------------------------------------------------------------


def mask_png(labels: np.ndarray, colors: list[list[int]]) -> bytes:
    """A palette PNG of class indices: pixel values are the indices, the palette the
    class colours (unused entries black)."""
    from PIL import Image

    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(colors)] = np.asarray(colors, dtype=np.uint8)
    image = Image.fromarray(labels, mode="P")
    image.putpalette(palette.reshape(-1).tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def overlay_jpeg(image: np.ndarray, labels: np.ndarray, info: ModelInfo) -> bytes:
    """The image blended with its class colours, with a legend of the classes present."""
    from PIL import Image, ImageDraw

    colors = np.zeros((256, 3), dtype=np.uint8)
    colors[: len(info.class_colors)] = np.asarray(info.class_colors, dtype=np.uint8)
    blended = (0.45 * image + 0.55 * colors[labels]).round().astype(np.uint8)
    present = [int(k) for k in np.unique(labels) if k < len(info.class_names)]
    row, swatch = 16, 12
    legend = Image.new("RGB", (image.shape[1], row * max(1, len(present)) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for line, k in enumerate(present):
        top = 2 + line * row
        draw.rectangle([4, top, 4 + swatch, top + swatch], fill=tuple(info.class_colors[k]),
                       outline=(0, 0, 0))  # fmt: skip
        draw.text((8 + swatch, top), info.class_names[k], fill=(0, 0, 0))
    canvas = Image.new("RGB", (image.shape[1], image.shape[0] + legend.height), (255, 255, 255))
    canvas.paste(Image.fromarray(blended), (0, 0))
    canvas.paste(legend, (0, image.shape[0]))
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# --- the whole command ----------------------------------------------------------------


@dataclass
class PredictResult:
    written: list[Path] = field(default_factory=list)  # mask files
    failed: list[tuple[Path, str]] = field(default_factory=list)  # with --keep-going
    seconds: float = 0.0

    @property
    def images(self) -> int:
        return len(self.written)


def _groups(items: list[InputImage], batch_size: int) -> Iterator[list[tuple[InputImage, Any]]]:
    """Consecutive images of one size, at most ``batch_size`` at a time, decoded once;
    an unreadable image comes alone, with its :class:`InputError` in place of pixels."""
    group: list[tuple[InputImage, Any]] = []
    for item in items:
        try:
            pixels: Any = read_image(item.path)
        except InputError as error:
            if group:
                yield group
                group = []
            yield [(item, error)]
            continue
        if group and (group[0][1].shape != pixels.shape or len(group) >= batch_size):
            yield group
            group = []
        group.append((item, pixels))
    if group:
        yield group


def predict(
    model_path: str | Path,
    inputs: Sequence[str],
    out: str | Path,
    *,
    tile: int | None = None,
    overlap: int = 0,
    context: int = CONTEXT,
    flip: bool = False,
    overlay: bool = False,
    batch_size: int = 8,
    device: str = "auto",
    keep_going: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> PredictResult:
    """Predict every image of ``inputs`` with the model at ``model_path`` into ``out``
    (see the module docstring). Raises :class:`InputError` or :class:`CheckpointError`
    naming the file at the first bad input (``keep_going``: skips it, lists it in the
    result's ``failed``)."""
    import time

    from tqdm import tqdm

    if tile is not None and not 0 <= overlap < tile:
        raise PipelineError(f"--overlap {overlap}: must be at least 0 and less than --tile {tile}")
    if context < 0:
        raise PipelineError(f"--context {context}: must be at least 0")
    info, scorer = load_scorer(model_path, device)
    items = collect_inputs(inputs)
    out = Path(out)
    result = PredictResult()
    start = time.perf_counter()
    if progress is None:
        progress = sys.stderr.isatty() and not os.environ.get("CI")
    bar = tqdm(total=len(items), desc="predict", unit="img", disable=not progress)
    for group in _groups(items, 1 if tile else batch_size):
        if isinstance(group[0][1], InputError):
            if not keep_going:
                raise group[0][1]
            result.failed.append((group[0][0].path, str(group[0][1])))
            bar.update(1)
            continue
        batch = torch.stack([normalize(pixels, info) for _, pixels in group])
        if tile:
            labels = [predict_tiled(scorer, batch[0], tile=tile, overlap=overlap,
                                    context=context, flip=flip, batch_size=batch_size)]  # fmt: skip
        else:
            labels = list(predict_whole(scorer, batch, flip))
        for (item, pixels), mask in zip(group, labels, strict=True):
            target = out / output_name(item)
            atomic_write_bytes(target, mask_png(mask, info.class_colors))
            if overlay:
                atomic_write_bytes(
                    target.with_suffix(".overlay.jpg"), overlay_jpeg(pixels, mask, info)
                )
            result.written.append(target)
        bar.update(len(group))
    bar.close()
    result.seconds = time.perf_counter() - start
    log(
        f"predicted {result.images} image(s) into {printable(out)} in {result.seconds:.1f} s"
        + (f"; {len(result.failed)} failed" if result.failed else "")
    )
    for path, reason in result.failed:
        log(f"failed: {reason}" if printable(path) in reason else f"failed: {path}: {reason}")
    return result


def describe(model_path: str | Path) -> dict[str, Any]:
    """What ``fcn-pipeline predict --info`` prints: the model file's metadata."""
    info, _ = load_scorer(model_path, "cpu")
    return info.to_json()


__all__ = [
    "InputError",
    "InputImage",
    "ModelInfo",
    "collect_inputs",
    "describe",
    "load_scorer",
    "mask_png",
    "normalize",
    "overlay_jpeg",
    "predict",
    "predict_tiled",
    "predict_whole",
    "read_image",
    "tile_starts",
]
