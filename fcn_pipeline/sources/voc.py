"""PASCAL VOC 2012 segmentation layout.

``JPEGImages/<id>.jpg``, palette-indexed ``SegmentationClass/<id>.png`` and the
split lists ``ImageSets/Segmentation/{train,val}.txt``. Mask value 255 marks
object boundaries and "difficult" regions and is kept as the ignore label. The
JPEG bytes are stored unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fcn_pipeline.sources import Listing, PairRef, Source, color_map
from fcn_pipeline.sources.files import read_bytes, read_index_mask, read_lines

CLASS_NAMES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


class VOCSource(Source):
    format = "voc"

    def __init__(self, root: Path):
        self.root = Path(root)

    def scan(self) -> Listing:
        pairs: list[PairRef] = []
        problems: list[tuple[str, str]] = []
        seen: dict[str, str] = {}
        lists = self.root / "ImageSets" / "Segmentation"
        for split in ("train", "val"):
            list_file = lists / f"{split}.txt"
            if not list_file.is_file():
                problems.append((str(list_file), "split list missing"))
                continue
            ids = [line.strip() for line in read_lines(list_file, problems) if line.strip()]
            if not ids:
                problems.append((str(list_file), f"split {split!r} lists no images"))
            for image_id in ids:
                if image_id in seen:
                    problems.append(
                        (str(list_file), f"duplicate id {image_id!r} (also in {seen[image_id]})")
                    )
                    continue
                seen[image_id] = split
                image = self.root / "JPEGImages" / f"{image_id}.jpg"
                mask = self.root / "SegmentationClass" / f"{image_id}.png"
                if not image.is_file():
                    problems.append((str(image), f"listed in {list_file.name} but missing"))
                elif not mask.is_file():
                    problems.append((str(mask), f"listed in {list_file.name} but missing"))
                else:
                    pairs.append(PairRef(split, image_id, str(image), str(mask)))
        return Listing(
            CLASS_NAMES, color_map(len(CLASS_NAMES)), pairs, problems, {"format": self.format}
        )

    def load(self, pair: PairRef) -> tuple[bytes, np.ndarray]:
        # Palette indices are the labels (255 = boundary, already the ignore value).
        return read_bytes(pair.image), read_index_mask(pair.mask)
