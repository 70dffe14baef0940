"""The embedded default dataset: seeded street-like scenes drawn with scikit-image.

Classes differ by shape, size and texture, never by colour: every object and
the background take colours from the same uniform RGB distribution, so a
per-pixel colour classifier learns next to nothing (see ``benchmarks/``), while
a network that sees context can.

- ``background``: two random colours mixed by a smooth random field (mottled).
- ``bus``: a large rounded box with a row of windows, drawn first (behind
  everything); when present it often fills more than half of the image: the
  "one object fills the image" case of the FCN questions.
- ``disc``: ellipses shaded radially between two colours.
- ``triangle``: flat-coloured triangles.
- ``checker``: rotated squares with a two-colour checkerboard texture.
- ``pole``: long thin bars a few pixels wide: the rare, thin class.

Objects overlap and occlude each other; Gaussian noise is added last. Image
``i`` of a split depends only on ``(seed, split, i)``, never on sharding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from skimage import draw
from skimage.transform import resize

from fcn_pipeline.sources import Listing, PairRef, Source, color_map
from fcn_pipeline.store import encode_png

if TYPE_CHECKING:  # worker processes import this module; keep pydantic out of their start-up
    from fcn_pipeline.config import SyntheticParams

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
MIN_CONTRAST = 0.3  # L2 RGB distance an object keeps from what it is drawn over


def _contrasting_color(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A uniform random colour, redrawn (a few times) if too close to ``under``."""
    reference = under.reshape(-1, 3).mean(axis=0) if under.size else np.full(3, 0.5)
    for _ in range(8):
        color = rng.random(3)
        if np.linalg.norm(color - reference) > MIN_CONTRAST:
            break
    return color


def _paint(image, mask, label, rr, cc, colors) -> None:
    """Write ``colors`` ((n, 3) or (3,)) and ``label`` at pixel indices rr, cc."""
    image[rr, cc] = colors
    mask[rr, cc] = label


def _background(rng, height, width) -> np.ndarray:
    coarse = rng.random((height // 16 + 2, width // 16 + 2))
    field = resize(coarse, (height, width), order=3, mode="reflect", anti_aliasing=False)
    field = np.clip(field, 0.0, 1.0)[..., None]
    c0, c1 = rng.random(3), rng.random(3)
    return c0 * (1.0 - field) + c1 * field


def _bus(rng, image, mask, label) -> None:
    height, width = mask.shape
    bh = int(rng.uniform(0.5, 0.95) * height)
    bw = int(rng.uniform(0.6, 1.05) * width)
    top = int(rng.integers(0, height - bh + 1))
    left = int(rng.integers(-bw // 8, width - bw + bw // 8 + 1))
    # Rounded box: inside the rectangle shrunk by the corner radius, dilated by it.
    radius = max(2, min(bh, bw) // 8)
    y, x = np.mgrid[top : top + bh, left : left + bw]
    dy = np.maximum(0, np.maximum(top + radius - y, y - (top + bh - 1 - radius)))
    dx = np.maximum(0, np.maximum(left + radius - x, x - (left + bw - 1 - radius)))
    inside = (dy**2 + dx**2 <= radius**2) & (x >= 0) & (x < width)
    rr, cc = y[inside], x[inside]
    body = _contrasting_color(rng, image[rr, cc])
    _paint(image, mask, label, rr, cc, body)
    # A band of windows in the upper part: a periodic texture of another colour.
    window_color = _contrasting_color(rng, body[None])
    period = int(rng.integers(9, 17))
    win_top = top + int(0.15 * bh)
    win_bottom = top + int(rng.uniform(0.4, 0.55) * bh)
    in_band = (y >= win_top) & (y < win_bottom) & ((x - left) % period < int(0.65 * period))
    window = inside & in_band & (x - left > radius) & (left + bw - x > radius)
    _paint(image, mask, label, y[window], x[window], window_color)


def _disc(rng, image, mask, label) -> None:
    height, width = mask.shape
    r_radius = rng.uniform(5, 16)
    c_radius = r_radius * rng.uniform(0.7, 1.4)
    r0, c0 = rng.uniform(0, height), rng.uniform(0, width)
    rr, cc = draw.ellipse(
        r0, c0, r_radius, c_radius, shape=mask.shape, rotation=rng.uniform(0, np.pi)
    )
    if rr.size == 0:
        return
    inner = _contrasting_color(rng, image[rr, cc])
    outer = _contrasting_color(rng, image[rr, cc])
    t = np.hypot((rr - r0) / r_radius, (cc - c0) / c_radius).clip(0, 1)[:, None]
    _paint(image, mask, label, rr, cc, inner * (1 - t) + outer * t)


def _triangle(rng, image, mask, label) -> None:
    height, width = mask.shape
    radius = rng.uniform(7, 18)
    r0, c0 = rng.uniform(0, height), rng.uniform(0, width)
    angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3 + rng.normal(0, 0.15, 3)
    rr, cc = draw.polygon(
        r0 + radius * np.sin(angles), c0 + radius * np.cos(angles), shape=mask.shape
    )
    if rr.size:
        _paint(image, mask, label, rr, cc, _contrasting_color(rng, image[rr, cc]))


def _checker(rng, image, mask, label) -> None:
    height, width = mask.shape
    half = rng.uniform(6, 15)
    r0, c0 = rng.uniform(0, height), rng.uniform(0, width)
    theta = rng.uniform(0, np.pi / 2)
    corners = np.array([[-1, -1], [-1, 1], [1, 1], [1, -1]]) * half
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    rows, cols = (corners @ rot.T).T
    rr, cc = draw.polygon(r0 + rows, c0 + cols, shape=mask.shape)
    if rr.size == 0:
        return
    # Checkerboard in the square's own (rotated) coordinates.
    cell = rng.uniform(2.5, 4.5)
    u = (rr - r0) * np.cos(theta) + (cc - c0) * np.sin(theta)
    v = -(rr - r0) * np.sin(theta) + (cc - c0) * np.cos(theta)
    parity = ((np.floor(u / cell) + np.floor(v / cell)) % 2)[:, None]
    a = _contrasting_color(rng, image[rr, cc])
    b = _contrasting_color(rng, a[None])
    _paint(image, mask, label, rr, cc, a * (1 - parity) + b * parity)


def _pole(rng, image, mask, label, width_range) -> None:
    height, width = mask.shape
    length = rng.uniform(0.4, 0.9) * min(height, width)
    thickness = rng.uniform(width_range[0], width_range[1] + 1e-9)
    r0, c0 = rng.uniform(0, height), rng.uniform(0, width)
    theta = rng.normal(0, 0.35) if rng.random() < 0.7 else rng.uniform(0, np.pi)  # mostly upright
    along = np.array([np.cos(theta), np.sin(theta)]) * length / 2
    across = np.array([-np.sin(theta), np.cos(theta)]) * thickness / 2
    corners = np.array([along + across, along - across, -along - across, -along + across])
    rr, cc = draw.polygon(r0 + corners[:, 0], c0 + corners[:, 1], shape=mask.shape)
    if rr.size:
        _paint(image, mask, label, rr, cc, _contrasting_color(rng, image[rr, cc]))


def render_scene(params: SyntheticParams, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw scene ``index`` of ``split``: ``(H, W, 3)`` uint8 image, ``(H, W)`` uint8 mask."""
    rng = np.random.default_rng([params.seed, SPLIT_CODES[split], index])
    height, width = params.height, params.width
    labels = {name: i for i, name in enumerate(params.classes)}
    image = _background(rng, height, width)
    mask = np.zeros((height, width), dtype=np.uint8)
    if "bus" in labels and rng.random() < params.bus_probability:
        _bus(rng, image, mask, labels["bus"])
    small = [name for name in params.classes if name not in ("background", "bus")]
    low, high = params.objects_per_image
    for name in rng.choice(small, size=int(rng.integers(low, high + 1))) if small else []:
        if name == "pole":
            _pole(rng, image, mask, labels[name], params.pole_width)
        else:
            {"disc": _disc, "triangle": _triangle, "checker": _checker}[name](
                rng, image, mask, labels[name]
            )
    image = image + rng.normal(0.0, params.noise_std, image.shape)
    return (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8), mask


class SyntheticSource(Source):
    format = "synthetic"

    def __init__(self, params: SyntheticParams):
        self.params = params

    def scan(self) -> Listing:
        pairs = [
            PairRef(split, f"{split}-{i:05d}", index=i)
            for split, count in self.params.splits.items()
            for i in range(count)
        ]
        description = {"format": self.format, "generator": self.params.model_dump(mode="json")}
        names = list(self.params.classes)
        return Listing(names, color_map(len(names)), pairs, [], description)

    def load(self, pair: PairRef) -> tuple[bytes, np.ndarray]:
        image, mask = render_scene(self.params, pair.split, pair.index)
        return encode_png(image), mask
