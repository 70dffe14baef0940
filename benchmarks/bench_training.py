"""Is training bound by data loading? Loader throughput vs training-step throughput.

In one run, on the ingested train split (default ``data/ingested``, else a synthetic
copy ingested into a temporary directory):

1. **loader**: images/s of the training DataLoader alone (read the Parquet shards,
   decode PNGs, normalise, pad-collate), with 0 worker processes and with ``--workers``.
2. **step**: images/s of forward + loss + backward + optimizer steps on batches
   already in memory (the compute alone), with ``train.width`` and ``train.batch_size``.
3. **epoch**: one real epoch through ``train_one_epoch`` (loader and steps together)
   and the share of it spent waiting for the loader.

Training is not bound by loading when the loader's images/s is well above the step's,
and the epoch's wait share is small.

    .venv/bin/python benchmarks/bench_training.py            # ~1-2 min on a 2-core CPU
    .venv/bin/python benchmarks/bench_training.py --width 0.125 --batch-size 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from fcn_pipeline.config import DataParams, TrainParams, load_params
from fcn_pipeline.data import SegmentationDataset, train_loader
from fcn_pipeline.losses import segmentation_loss
from fcn_pipeline.models import build_fcn, parameter_groups
from fcn_pipeline.runtime import autocast, resolve_device
from fcn_pipeline.training import build_criterion, build_scheduler, train_one_epoch


def loader_throughput(dataset: SegmentationDataset, batch_size: int, workers: int) -> float:
    """Images/s of one full pass of the training loader (worker start-up included)."""
    start = time.perf_counter()
    images = 0
    for batch in train_loader(dataset, batch_size, seed=0, workers=workers):
        images += len(batch.ids)
    return images / (time.perf_counter() - start)


def step_throughput(
    model: torch.nn.Module,
    batches: list,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    warmup: int = 2,
) -> float:
    """Images/s of training steps on in-memory batches (after ``warmup`` steps)."""
    model.train()
    images, start = 0, 0.0
    for i, batch in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, images = time.perf_counter(), 0
        x, y = batch.images.to(device), batch.masks.to(device)
        x = x.contiguous(memory_format=torch.channels_last)  # as training.train_one_epoch
        with autocast(device):
            logits = model(x)
        loss = segmentation_loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        images += len(batch.ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="ingested dataset (default data/ingested)")
    parser.add_argument("--variant", default="fcn8s", choices=["fcn32s", "fcn16s", "fcn8s"])
    parser.add_argument("--width", type=float, default=None, help="default: train.width")
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--workers", type=int, default=None, help="default: train.workers")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps")
    args = parser.parse_args()

    defaults = load_params("params.yaml").train if Path("params.yaml").exists() else TrainParams()
    width = args.width or defaults.width
    batch_size = args.batch_size or defaults.batch_size
    workers = defaults.workers if args.workers is None else args.workers
    device = resolve_device("auto")

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data or "data/ingested")
        if not (data / "dataset.json").exists():
            from fcn_pipeline.ingest import ingest

            data = Path(tmp) / "ingested"
            print(f"ingesting the default synthetic dataset into {data} ...")
            ingest(DataParams(), data)
        dataset = SegmentationDataset(data, "train")
        height, width_px = dataset.sizes[0]
        print(
            f"device {device}, {torch.get_num_threads()} torch threads; {len(dataset)} train "
            f"images of {height}x{width_px} from {data}; {args.variant}, width {width}, "
            f"batch {batch_size}"
        )

        # 1. The loader alone.
        for n in sorted({0, workers}):
            rate = loader_throughput(dataset, batch_size, n)
            print(f"loader  workers={n}: {rate:8.1f} images/s (read + decode + collate)")

        # 2. Training steps alone, on batches already decoded.
        torch.manual_seed(0)
        model = build_fcn(args.variant, dataset.num_classes, width=width)
        model.to(device, memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(parameter_groups(model, 1e-3, 5e-4))
        batches = []
        for batch in train_loader(dataset, batch_size, seed=0, workers=0):
            batches.append(batch)
            if len(batches) == args.steps + 2:
                break
        step_rate = step_throughput(model, batches, optimizer, device)
        print(f"step    in memory:  {step_rate:8.1f} images/s (forward + backward + update)")

        # 3. One real epoch: loader and steps together.
        params = TrainParams(
            data=str(data), width=width, batch_size=batch_size, workers=workers, device="auto"
        )
        loader = train_loader(dataset, batch_size, seed=1, workers=workers, drop_last=True)
        criterion = build_criterion(params, dataset.meta.class_names, model.output_stride)
        scheduler = build_scheduler(optimizer, params, len(loader))
        stats = train_one_epoch(model, criterion, optimizer, scheduler, loader, device, epoch=1)
        print(
            f"epoch   workers={workers}: {stats.images_per_second:8.1f} images/s, "
            f"{100 * stats.data_seconds / stats.seconds:.1f}% of the time waiting for data"
        )


if __name__ == "__main__":
    main()
