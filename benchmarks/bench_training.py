"""Is training bound by data loading? Loader throughput vs training-step throughput.

In one run, on the ingested train split (default ``data/ingested``, else a synthetic
copy ingested into a temporary directory):

1. **loader**: images/s of the training DataLoader alone (read the Parquet shards,
   decode PNGs, normalise, pad-collate), with 0 worker processes and with ``--workers``.
2. **step**: images/s of forward + loss + backward + optimizer steps on batches
   already in memory (the compute alone), with ``train.width`` and ``train.batch_size``.
3. **epoch**: one real epoch through ``train_one_epoch`` (loader and steps together,
   images mirrored at random, the optimizer of ``build_optimizer``) and the share of
   it spent waiting for the loader.
4. **kernels** (``--compare-kernels``, for CUDA): real epochs as training ran before
   on CUDA (deterministic algorithms without cuDNN autotuning, the loss read back after
   every step, images mirrored on the host, Adam's default multi-tensor step), then with
   each change added in turn: :func:`fcn_pipeline.runtime.kernel_settings`, the loss
   read every ``LOSS_CHECK_STEPS`` steps, mirroring on the device, a fused optimizer
   step (now); the last of ``--epochs`` epochs of each case is timed. ``--profile``:
   one more epoch under ``torch.profiler``, its top ops by device and host time.

Training is not bound by loading when the loader's images/s is well above the step's,
and the epoch's wait share is small.

    .venv/bin/python benchmarks/bench_training.py            # ~1-2 min on a 2-core CPU
    .venv/bin/python benchmarks/bench_training.py --width 0.125 --batch-size 4
    python benchmarks/bench_training.py --device cuda --width 1.0 --batch-size 4 \
        --synthetic 360x480 --images 160 --compare-kernels   # a GPU, CamVid's size
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from fcn_pipeline.config import DataParams, SyntheticParams, TrainParams, load_params
from fcn_pipeline.data import Batch, SegmentationDataset, train_loader
from fcn_pipeline.epoch import LOSS_CHECK_STEPS, EpochStats, random_hflip, train_one_epoch
from fcn_pipeline.losses import segmentation_loss
from fcn_pipeline.models import build_fcn, parameter_groups
from fcn_pipeline.runtime import autocast, kernel_settings, resolve_device
from fcn_pipeline.schedules import build_scheduler
from fcn_pipeline.training import build_criterion, build_optimizer


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
        x = x.contiguous(memory_format=torch.channels_last)  # as fcn_pipeline.epoch.train_one_epoch
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


@contextmanager
def kernels_before(device: torch.device) -> Iterator[None]:
    """The kernel settings training ran under before ``kernel_settings``: deterministic
    algorithms (warnings only on CUDA) and cuDNN's default heuristics, no autotuning."""
    was = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0])
        torch.backends.cudnn.benchmark = was[1]


@dataclass(frozen=True)
class Case:
    """How one epoch of the comparison trains."""

    name: str
    settings: Callable  # kernels_before or kernel_settings
    loss_check_steps: int
    flips: str  # "host": mirrored on the CPU before the copy (as before); "device": after
    fused: bool  # a fused optimizer step


def host_flipped(loader) -> Iterator:
    """The loader's batches mirrored on the host, as training did before: the flipped
    copies are new, pageable tensors, not the loader's pinned ones."""
    for batch in loader:
        images, masks = random_hflip(batch.images, batch.masks)
        yield Batch(images, masks, batch.ids, batch.sizes)


def kernel_cases() -> list[Case]:
    """The changes to CUDA training one after the other, from before to now."""
    now = LOSS_CHECK_STEPS
    return [
        Case("before: deterministic, read/step, host flips", kernels_before, 1, "host", False),
        Case("+ cuDNN autotuning", kernel_settings, 1, "host", False),
        Case(f"+ loss read every {now} steps", kernel_settings, now, "host", False),
        Case("+ flips on the device", kernel_settings, now, "device", False),
        Case("now: + fused optimizer", kernel_settings, now, "device", True),
    ]


def compare_kernels(run_epoch, device: torch.device, epochs: int) -> list[dict]:
    """Images/s of the last of ``epochs`` real epochs of each case of :func:`kernel_cases`
    (the first epochs of each are warm-up, for cuDNN's autotuner among others)."""
    baseline, results = None, []
    for case in kernel_cases():
        with case.settings(device):
            for _ in range(epochs):
                stats = run_epoch(case)
        rate = stats.images_per_second
        baseline = baseline or rate
        wait = stats.data_seconds / stats.seconds
        print(
            f"kernels {case.name:<46} {rate:8.1f} images/s  x{rate / baseline:.2f}  "
            f"({100 * wait:.1f}% waiting for data)"
        )
        results.append(
            {
                "case": case.name,
                "loss_check_steps": case.loss_check_steps,
                "flips": case.flips,
                "fused": case.fused,
                "images_per_second": rate,
                "speedup_vs_before": rate / baseline,
                "data_wait_share": wait,
            }
        )
    return results


def profile_epoch(run_epoch, device: torch.device, rows: int = 18) -> None:
    """One more epoch as training runs now, under torch.profiler: the ops that took the
    most device time (CUDA) and the most host time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with kernel_settings(device), profile(activities=activities) as prof:
        run_epoch()
        if device.type == "cuda":
            torch.cuda.synchronize()
    table = prof.key_averages()
    keys = ["self_cpu_time_total"]
    if device.type == "cuda":
        keys.insert(0, "self_cuda_time_total")
    for key in keys:
        print(f"profile, top ops by {key}:")
        print(table.table(sort_by=key, row_limit=rows, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="ingested dataset (default data/ingested)")
    parser.add_argument("--variant", default="fcn8s", choices=["fcn32s", "fcn16s", "fcn8s"])
    parser.add_argument("--width", type=float, default=None, help="default: train.width")
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--workers", type=int, default=None, help="default: train.workers")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--synthetic", default=None, metavar="HxW", help="ingest a synthetic set of this size"
    )
    parser.add_argument("--images", type=int, default=160, help="--synthetic: train images")
    parser.add_argument(
        "--compare-kernels", action="store_true", help="time epochs under each kernel setting"
    )
    parser.add_argument("--epochs", type=int, default=2, help="--compare-kernels: per case")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument(
        "--profile", action="store_true", help="profile one more epoch (now) and print its top ops"
    )
    args = parser.parse_args()

    defaults = load_params("params.yaml").train if Path("params.yaml").exists() else TrainParams()
    width = args.width or defaults.width
    batch_size = args.batch_size or defaults.batch_size
    workers = defaults.workers if args.workers is None else args.workers
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data or "data/ingested")
        if args.synthetic or not (data / "dataset.json").exists():
            from fcn_pipeline.ingest import ingest

            data_params = DataParams()
            if args.synthetic:
                height, width_px = (int(n) for n in args.synthetic.lower().split("x"))
                splits = {"train": args.images, "val": 1, "test": 1}
                synthetic = SyntheticParams(height=height, width=width_px, splits=splits)
                data_params = DataParams(synthetic=synthetic)
            data = Path(tmp) / "ingested"
            print(f"ingesting a synthetic dataset into {data} ...")
            ingest(data_params, data)
        dataset = SegmentationDataset(data, "train")
        height, width_px = dataset.sizes[0]
        print(
            f"device {device}, {torch.get_num_threads()} torch threads; {len(dataset)} train "
            f"images of {height}x{width_px} from {data}; {args.variant}, width {width}, "
            f"batch {batch_size}"
        )
        figures: dict = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "settings": {
                "variant": args.variant,
                "width": width,
                "batch_size": batch_size,
                "workers": workers,
                "images": len(dataset),
                "height": height,
                "width_px": width_px,
            },
            "loader_images_per_second": {},
        }

        # 1. The loader alone.
        for n in sorted({0, workers}):
            rate = loader_throughput(dataset, batch_size, n)
            figures["loader_images_per_second"][str(n)] = rate
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
        with kernel_settings(device):
            step_rate = step_throughput(model, batches, optimizer, device)
        figures["step_images_per_second"] = step_rate
        print(f"step    in memory:  {step_rate:8.1f} images/s (forward + backward + update)")

        # 3. One real epoch: loader and steps together.
        params = TrainParams(
            data=str(data), width=width, batch_size=batch_size, workers=workers, device="auto"
        )
        loader = train_loader(
            dataset,
            batch_size,
            seed=1,
            workers=workers,
            pin_memory=device.type == "cuda",
            drop_last=True,
        )
        criterion = build_criterion(params, dataset.meta.class_names, model.output_stride)
        now = kernel_cases()[-1]
        optimizers: dict[bool, tuple] = {}

        def run_epoch(case: Case = now) -> EpochStats:
            if case.fused not in optimizers:  # one optimizer (and schedule) per kind
                optimizer = build_optimizer(model, params, fused=case.fused)
                steps = len(loader) * (2 + 5 * args.epochs)
                optimizers[case.fused] = optimizer, build_scheduler(optimizer, params, steps)
            optimizer, scheduler = optimizers[case.fused]
            host = case.flips == "host"
            return train_one_epoch(
                model, criterion, optimizer, scheduler, host_flipped(loader) if host else loader,
                device, 1, hflip=not host, loss_check_steps=case.loss_check_steps,
            )  # fmt: skip

        with kernel_settings(device):
            stats = run_epoch()
        figures["epoch"] = {
            "images_per_second": stats.images_per_second,
            "data_wait_share": stats.data_seconds / stats.seconds,
        }
        print(
            f"epoch   workers={workers}: {stats.images_per_second:8.1f} images/s, "
            f"{100 * stats.data_seconds / stats.seconds:.1f}% of the time waiting for data"
        )

        # 4. The kernel settings, one at a time.
        if args.compare_kernels:
            figures["kernels"] = compare_kernels(run_epoch, device, args.epochs)
        if args.profile:
            profile_epoch(run_epoch, device)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
