"""How far does colour alone get? Per-pixel logistic regression on RGB.

Usage: python benchmarks/colour_baseline.py [INGESTED_DIR]   (default: ingests
the synthetic default from params.yaml into a temporary directory first)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from fcn_pipeline.baselines import colour_classifier_scores
from fcn_pipeline.config import load_params
from fcn_pipeline.ingest import ingest
from fcn_pipeline.store import read_dataset_meta


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if len(sys.argv) > 1:
            dataset = Path(sys.argv[1])
        else:
            dataset = ingest(load_params("params.yaml").data, Path(tmp) / "ingested").out
        names = read_dataset_meta(dataset).class_names
        scores = colour_classifier_scores(dataset)
    print(f"colour-only logistic regression on {dataset}:")
    for key in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"):
        print(f"  {key:10s} {scores[key]:.3f}")
    for name, iu in zip(names, scores["per_class_iu"], strict=True):
        print(f"  IU {name:12s} {iu:.3f}")


if __name__ == "__main__":
    main()
