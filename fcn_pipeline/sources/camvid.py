"""CamVid in the SegNet layout: ``<split>/`` images, ``<split>annot/`` masks.

Masks hold class indices 0..10; 11 is "Unlabelled" (void) and becomes 255.
Pairs are matched by file name, never by the list files' absolute prefixes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fcn_pipeline.sources import Listing, PairError, PairRef, Source
from fcn_pipeline.sources.files import files_by_stem, read_bytes, read_index_mask
from fcn_pipeline.store import IGNORE_INDEX

CLASS_NAMES = [
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
]  # fmt: skip
CLASS_COLORS = [
    [128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222],
    [128, 128, 0], [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192],
]  # fmt: skip
VOID_VALUE = 11


class CamVidSource(Source):
    format = "camvid"

    def __init__(self, root: Path):
        self.root = Path(root)

    def scan(self) -> Listing:
        pairs: list[PairRef] = []
        problems: list[tuple[str, str]] = []
        for split in ("train", "val", "test"):
            image_dir, mask_dir = self.root / split, self.root / f"{split}annot"
            missing = [d for d in (image_dir, mask_dir) if not d.is_dir()]
            for d in missing:
                problems.append((str(d), "directory missing"))
            if missing:
                continue
            images = files_by_stem(image_dir, problems=problems)
            masks = files_by_stem(mask_dir, problems=problems)
            for stem in sorted(images.keys() - masks.keys()):
                problems.append((str(images[stem]), f"no mask in {mask_dir}"))
            for stem in sorted(masks.keys() - images.keys()):
                problems.append((str(masks[stem]), f"no image in {image_dir}"))
            common = sorted(images.keys() & masks.keys())
            if not common:
                problems.append((str(image_dir), f"split {split!r} has no image/mask pairs"))
            pairs += [PairRef(split, stem, str(images[stem]), str(masks[stem])) for stem in common]
        return Listing(CLASS_NAMES, CLASS_COLORS, pairs, problems, {"format": self.format})

    def load(self, pair: PairRef) -> tuple[bytes, np.ndarray]:
        mask = read_index_mask(pair.mask)  # a fresh, writable array
        if mask.max(initial=0) > VOID_VALUE:
            bad = np.unique(mask[mask > VOID_VALUE]).tolist()
            raise PairError(pair.mask, f"mask values {bad} outside 0..{VOID_VALUE}")
        mask[mask == VOID_VALUE] = IGNORE_INDEX  # in place: faster than a lookup table
        return read_bytes(pair.image), mask
