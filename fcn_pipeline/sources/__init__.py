"""Dataset sources: each lists image/mask pairs and loads one pair at a time.

A source knows its file layout and label convention; :mod:`fcn_pipeline.ingest`
does the rest (validation, encoding, sharding) the same way for all of them.

``load`` returns the image bytes exactly as they will be stored and the mask as
an ``(H, W)`` uint8 array already in the canonical convention (class indices,
void/ignore = 255). Problems with one pair raise :class:`PairError`.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fcn_pipeline.errors import ConfigError

if TYPE_CHECKING:  # worker processes import sources; keep pydantic out of their start-up
    from fcn_pipeline.config import DataParams


class PairError(Exception):
    """One image/mask pair is unusable: ``path`` names the file, ``reason`` why."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class PairRef:
    """A reference to one image/mask pair; small and picklable for worker processes."""

    split: str
    id: str
    image: str = ""
    mask: str = ""
    index: int = 0  # the scene number, for generated sources


@dataclass
class Listing:
    """What a source found: classes, pairs, and pair-level problems."""

    class_names: list[str]
    class_colors: list[list[int]]
    pairs: list[PairRef]
    problems: list[tuple[str, str]] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)


class Source(ABC):
    """A dataset in some on-disk (or generated) layout."""

    format: str

    @abstractmethod
    def scan(self) -> Listing:
        """List every pair without decoding any image."""

    @abstractmethod
    def load(self, pair: PairRef) -> tuple[bytes, np.ndarray]:
        """Return ``(image_bytes, mask)``; raise :class:`PairError` on a bad pair."""


def color_map(n: int) -> list[list[int]]:
    """The PASCAL VOC colour map: bits of the class index spread over R, G, B.

    Bit 3k, 3k+1, 3k+2 of the index set bit 7-k of red, green and blue.
    """
    colors = []
    for index in range(n):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colors.append([r, g, b])
    return colors


def stable_fraction(key: str) -> float:
    """A number in [0, 1) that depends only on ``key`` (for stable split assignment)."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def open_source(params: DataParams) -> Source:
    """Build the source named by ``params.format`` (``root`` required for files)."""
    from fcn_pipeline.sources.camvid import CamVidSource
    from fcn_pipeline.sources.folder import FolderSource
    from fcn_pipeline.sources.synthetic import SyntheticSource
    from fcn_pipeline.sources.voc import VOCSource

    if params.format == "synthetic":
        return SyntheticSource(params.synthetic)
    if not params.root:
        raise ConfigError(f"data.root: required for data.format={params.format!r}")
    root = Path(params.root)
    if not root.is_dir():
        raise ConfigError(f"data.root: {root} is not a directory")
    if params.format == "camvid":
        return CamVidSource(root)
    if params.format == "voc":
        return VOCSource(root)
    return FolderSource(root, params.folder.split_fractions)
