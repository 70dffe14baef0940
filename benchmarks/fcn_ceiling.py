"""How well can an FCN of each output stride score a split at best?

Usage::

    .venv/bin/python benchmarks/fcn_ceiling.py --data data/ingested [--split test]

FCN-32s, FCN-16s and FCN-8s end in a score map at stride 32, 16 or 8 that a
bilinear kernel upsamples to the input; no network, however well trained, can
draw a boundary finer than that upsampling allows. For every image this fits a
free score map at the stride to the image's own labels (the cross-entropy FCN
trains with, through the bilinear upsampling; no network) and scores the argmax
with the FCN metrics (``fcn_pipeline.baselines.stride_ceiling_scores``). A
trained net generalises from other images and is bound by the same upsampling,
so its mean IU stays below these figures; thin classes show it most. Stride 4
is printed as well, for reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fcn_pipeline.baselines import stride_ceiling_scores
from fcn_pipeline.store import read_dataset_meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="an ingested dataset directory")
    parser.add_argument("--split", default="test")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps per batch of images")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    meta = read_dataset_meta(args.data)
    names = meta.class_names
    print(f"{args.data}, split {args.split}: {meta.split_images(args.split)} images")
    print(f"{'stride':>6} {'as in':<8} {'mean IU':>7}  " + " ".join(f"{n[:9]:>9}" for n in names))
    variants = {32: "FCN-32s", 16: "FCN-16s", 8: "FCN-8s", 4: "-"}
    start = time.perf_counter()
    scores = stride_ceiling_scores(args.data, args.split, tuple(variants), steps=args.steps)
    for stride, variant in variants.items():
        per_class = " ".join(f"{iu:9.3f}" for iu in scores[stride]["per_class_iu"])
        print(f"{stride:>6} {variant:<8} {scores[stride]['mean_iu']:7.3f}  {per_class}")
    seconds = time.perf_counter() - start
    print(f"({seconds:.0f} s)")
    if args.json:
        figures = {
            "data": str(args.data), "split": args.split, "steps": args.steps,
            "class_names": names, "seconds": seconds,
            "strides": {str(stride): scores[stride] for stride in variants},
        }  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
