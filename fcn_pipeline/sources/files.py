"""Helpers shared by the sources that read image and mask files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fcn_pipeline.sources import PairError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm")


def read_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise PairError(path, f"cannot read file ({error.strerror})") from None


def read_index_mask(path: str | Path, *, palette_ok: bool = True) -> np.ndarray:
    """Decode a single-channel class-index PNG (grey or palette) into (H, W) uint8."""
    data = read_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode == "P" and not palette_ok:
                raise PairError(path, "palette mask where a grey class-index mask is expected")
            if image.mode not in ("L", "P"):
                raise PairError(path, f"mask has mode {image.mode!r}, expected a class-index mask")
            return np.array(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise PairError(path, f"mask does not decode ({error})") from None


def files_by_stem(directory: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Map file stem -> path for the image files of ``directory``."""
    return {
        p.stem: p
        for p in sorted(directory.iterdir())
        if p.is_file() and p.suffix.lower() in suffixes
    }
