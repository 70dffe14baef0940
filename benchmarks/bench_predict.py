"""``fcn-pipeline predict`` against evaluation's forward pass, ONNX Runtime against PyTorch,
and the peak memory of a tiled 4000x3000 prediction, in one run.

1. **predict vs evaluate**: the test split of the default synthetic dataset (ingested
   into a temporary directory, its images also written as PNG files), scored by a model
   of the default architecture (``params.yaml``'s width, geometry, norm, upsampling;
   random weights: speed does not depend on them): images/s of evaluation's prediction
   loop (:func:`fcn_pipeline.evaluation.predict_and_count`, shards decoded by the
   loader) and of :func:`fcn_pipeline.predict.predict` on the PNG files (decode, predict,
   write palette PNGs), same batch size and threads.
2. **ONNX Runtime vs PyTorch** (CPU): images/s of the net alone on the same batches.
3. **memory**: peak RSS of ``fcn-pipeline predict`` on one 4000x3000 image in a fresh
   process, with ``--tile T --overlap O`` and in one piece, next to a 32x32 image's (what
   the process takes before any image).

    .venv/bin/python benchmarks/bench_predict.py            # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fcn_pipeline.checkpoints import model_record, save_file
from fcn_pipeline.config import load_params
from fcn_pipeline.data import SegmentationDataset
from fcn_pipeline.evaluation import predict_and_count
from fcn_pipeline.ingest import ingest
from fcn_pipeline.models import build_fcn
from fcn_pipeline.predict import load_scorer, normalize, predict


def best_of(runs: int, work) -> float:
    """The shortest of ``runs`` timings of ``work()`` (seconds)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss_mb(argv: list[str]) -> float:
    """Peak resident memory (MiB) of a child process running ``argv`` (its own, from
    ``wait4``, not the maximum over every child so far)."""
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {child.stderr.read().decode()}")
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    train = params.train
    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    ingest(params.data, work / "ingested")
    dataset = SegmentationDataset(work / "ingested", "test")
    names = dataset.meta.class_names
    model = build_fcn("fcn8s", len(names), width=train.width, geometry=train.geometry,
                      norm=train.norm, upsample=train.upsample).eval()  # fmt: skip
    save_file(work / "model.pt", model_record(model, names,
                                              class_colors=dataset.meta.class_colors))  # fmt: skip
    images = work / "images"
    images.mkdir()
    for i in range(len(dataset)):
        pixels, _, sample_id = dataset.decoded(i)
        Image.fromarray(pixels).save(images / f"{sample_id}.png")
    count = len(dataset)
    cpu = torch.device("cpu")

    evaluate_s = best_of(args.runs, lambda: predict_and_count(
        model, dataset, batch_size=args.batch_size, device=cpu, workers=0))  # fmt: skip
    predict_s = best_of(args.runs, lambda: predict(
        work / "model.pt", [str(images)], work / "masks", batch_size=args.batch_size,
        device="cpu", progress=False, log=lambda _: None))  # fmt: skip
    print(f"{count} images of {dataset.sizes[0][0]}x{dataset.sizes[0][1]}, batch "
          f"{args.batch_size}, {args.threads} threads, best of {args.runs}")  # fmt: skip
    print(f"evaluate forward loop : {count / evaluate_s:7.1f} img/s")
    print(
        f"predict (PNG in/out)  : {count / predict_s:7.1f} img/s "
        f"({evaluate_s / predict_s:.2f}x evaluate's rate)"
    )

    from fcn_pipeline.export import export_onnx

    export_onnx(work / "model.pt", work / "model.onnx")
    info, torch_scorer = load_scorer(work / "model.pt", "cpu")
    _, onnx_scorer = load_scorer(work / "model.onnx")
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(images.iterdir())]
    batches = [torch.stack([normalize(p, info) for p in pixels[i : i + args.batch_size]])
               for i in range(0, count, args.batch_size)]  # fmt: skip
    torch_s = best_of(args.runs, lambda: [torch_scorer(b) for b in batches])
    onnx_s = best_of(args.runs, lambda: [onnx_scorer(b) for b in batches])
    print(f"PyTorch CPU net alone : {count / torch_s:7.1f} img/s")
    print(f"ONNX Runtime CPU      : {count / onnx_s:7.1f} img/s ({torch_s / onnx_s:.2f}x PyTorch)")

    rng = np.random.default_rng(0)
    big, tiny = work / "big", work / "tiny"
    big.mkdir()
    tiny.mkdir()
    Image.fromarray(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)).save(big / "a.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tiny / "a.png")
    cli = [sys.executable, "-m", "flows.cli", "predict", str(work / "model.pt")]
    base = peak_rss_mb([*cli, str(tiny), "--device", "cpu", "--out", str(work / "o0")])
    tiled = peak_rss_mb([*cli, str(big), "--device", "cpu", "--out", str(work / "o1"),
                         "--tile", str(args.tile), "--overlap", str(args.overlap)])  # fmt: skip
    whole = peak_rss_mb([*cli, str(big), "--device", "cpu", "--out", str(work / "o2")])
    print(f"peak RSS, one 32x32 image (the process itself): {base:.0f} MiB")
    print(f"peak RSS, 4000x3000, --tile {args.tile} --overlap {args.overlap}: {tiled:.0f} MiB")
    print(f"peak RSS, 4000x3000 in one piece: {whole:.0f} MiB")


if __name__ == "__main__":
    main()
