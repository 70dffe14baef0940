"""Helpers shared by the sources that read image and mask files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fcn_pipeline.errors import is_utf8
from fcn_pipeline.sources import PairError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm")
# Pillow's errors for a file that is not an image it can decode (a truncated
# one raises OSError, a malformed header SyntaxError or ValueError).
DECODE_ERRORS = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    SyntaxError,
    ValueError,
)


def read_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise PairError(path, f"cannot read file ({error.strerror})") from None


def decode_failure(data: bytes, error: Exception) -> str:
    """Why Pillow could not decode ``data``, in words (never an object's repr)."""
    if isinstance(error, Image.DecompressionBombError):
        return f"too large to decode safely ({error})"
    if isinstance(error, UnidentifiedImageError):
        if not data:
            return "empty file (0 bytes), not an image"
        return f"not an image format Pillow reads (file starts with {data[:8]!r})"
    return f"{type(error).__name__}: {error}"


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
    except DECODE_ERRORS as error:
        raise PairError(path, f"mask does not decode: {decode_failure(data, error)}") from None


def files_by_stem(
    directory: Path,
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
    problems: list[tuple[str, str]] | None = None,
) -> dict[str, Path]:
    """Map file stem (the image id) -> path for the image files of ``directory``.

    Two files with one stem (``a.png`` and ``a.jpg``) would give one id to two
    pictures: each such pair is added to ``problems`` naming both, and the stem
    maps to the first in name order.
    """
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if not (path.is_file() and path.suffix.lower() in suffixes):
            continue
        if not is_utf8(path.name):  # the id goes into Parquet and JSON, which hold UTF-8
            if problems is not None:
                problems.append((str(path), "file name is not valid UTF-8; rename the file"))
            continue
        if path.stem in found:
            if problems is not None:
                problems.append(
                    (str(path), f"same image id {path.stem!r} as {found[path.stem]}; keep one")
                )
            continue
        found[path.stem] = path
    return found


def read_lines(path: Path, problems: list[tuple[str, str]]) -> list[str]:
    """The lines of a UTF-8 text file (a list of ids or classes).

    A line that is not valid UTF-8 is added to ``problems`` (as ``<path>:<line>``) and
    read as an empty line; an unreadable file is a problem and reads as no lines.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        problems.append((str(path), f"cannot read file ({error.strerror})"))
        return []
    lines = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            problems.append((f"{path}:{number}", f"not valid UTF-8: {raw!r}"))
            lines.append("")
    return lines
