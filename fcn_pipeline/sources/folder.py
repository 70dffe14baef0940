"""A plain folder: ``images/`` and ``masks/`` with matching stems.

- ``classes.txt``: one class per line, ``name`` or ``name R G B``.
- ``masks/<stem>.png``: single-channel class indices; 255 = ignore.
- ``splits/<split>.txt`` (optional): stems of each split. Without them each
  image goes to a split chosen from a hash of its stem (``split_fractions``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fcn_pipeline.sources import Listing, PairRef, Source, color_map, stable_fraction
from fcn_pipeline.sources.files import files_by_stem, read_bytes, read_index_mask, read_lines
from fcn_pipeline.store import IGNORE_INDEX, SPLITS


class FolderSource(Source):
    format = "folder"

    def __init__(self, root: Path, split_fractions: dict[str, float]):
        self.root = Path(root)
        self.split_fractions = dict(split_fractions)

    def _read_classes(self, problems: list[tuple[str, str]]) -> tuple[list[str], list[list[int]]]:
        path = self.root / "classes.txt"
        if not path.is_file():
            problems.append((str(path), "class list missing (one class name per line)"))
            return [], []
        names: list[str] = []
        colors: list[list[int] | None] = []
        for number, line in enumerate(read_lines(path, problems), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) not in (1, 4):
                problems.append((f"{path}:{number}", "expected 'name' or 'name R G B'"))
                continue
            if fields[0] in names:
                problems.append((f"{path}:{number}", f"duplicate class name {fields[0]!r}"))
            names.append(fields[0])
            try:
                rgb = [int(v) for v in fields[1:]]
            except ValueError:
                problems.append((f"{path}:{number}", "colour components must be integers"))
                rgb = []
            if any(not 0 <= v <= 255 for v in rgb):
                problems.append((f"{path}:{number}", "colour components must be in 0..255"))
            colors.append(rgb or None)
        if not names:
            problems.append((str(path), "no class names"))
        if len(names) > IGNORE_INDEX:
            problems.append(
                (str(path), f"{len(names)} classes; at most {IGNORE_INDEX} fit in uint8")
            )
        default = color_map(len(names))
        return names, [c if c else default[i] for i, c in enumerate(colors)]

    def _split_of(
        self, problems: list[tuple[str, str]], stems: list[str]
    ) -> tuple[dict[str, str], set[str]]:
        """Map stem -> split, and the set of splits the folder declares."""
        split_dir = self.root / "splits"
        if not split_dir.is_dir():
            order = list(self.split_fractions.items())
            assignment = {}
            for stem in stems:
                u, acc = stable_fraction(stem), 0.0
                assignment[stem] = order[-1][0]
                for split, fraction in order:
                    acc += fraction
                    if u < acc:
                        assignment[stem] = split
                        break
            return assignment, {s for s, f in order if f > 0}
        assignment: dict[str, str] = {}
        declared: set[str] = set()
        for split in SPLITS:
            list_file = split_dir / f"{split}.txt"
            if not list_file.is_file():
                continue
            declared.add(split)
            for stem in (s.strip() for s in read_lines(list_file, problems)):
                if not stem:
                    continue
                if stem in assignment:
                    problems.append(
                        (str(list_file), f"duplicate id {stem!r} (also in {assignment[stem]})")
                    )
                else:
                    assignment[stem] = split
        if not assignment:
            problems.append((str(split_dir), "no split lists (<split>.txt) with entries"))
        return assignment, declared

    def scan(self) -> Listing:
        problems: list[tuple[str, str]] = []
        names, colors = self._read_classes(problems)
        image_dir, mask_dir = self.root / "images", self.root / "masks"
        for d in (image_dir, mask_dir):
            if not d.is_dir():
                problems.append((str(d), "directory missing"))
        if problems and not (image_dir.is_dir() and mask_dir.is_dir()):
            return Listing(names, colors, [], problems, {"format": self.format})
        images = files_by_stem(image_dir, problems=problems)
        masks = files_by_stem(mask_dir, (".png",), problems)
        for stem in sorted(images.keys() - masks.keys()):
            problems.append((str(images[stem]), f"no mask in {mask_dir}"))
        for stem in sorted(masks.keys() - images.keys()):
            problems.append((str(masks[stem]), f"no image in {image_dir}"))
        common = sorted(images.keys() & masks.keys())
        assignment, declared = self._split_of(problems, common)
        for stem in sorted(assignment.keys() - set(common)):
            problems.append(
                (str(self.root / "splits"), f"lists {stem!r}, which has no image/mask pair")
            )
        pairs = [
            PairRef(assignment[s], s, str(images[s]), str(masks[s]))
            for s in common
            if s in assignment
        ]
        used = {p.split for p in pairs}
        for split in sorted(declared - used):
            problems.append((str(self.root), f"split {split!r} has no images"))
        return Listing(names, colors, pairs, problems, {"format": self.format})

    def load(self, pair: PairRef) -> tuple[bytes, np.ndarray]:
        return read_bytes(pair.image), read_index_mask(pair.mask)
