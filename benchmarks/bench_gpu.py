"""FCN training-step speed on a GPU: bf16 autocast + channels_last next to fp32 NCHW.

Times the training step of the pipeline (forward, the per-pixel loss, backward, an SGD
update, and the ``loss.item()`` that ``train_one_epoch`` reads every step to catch a NaN)
at the paper's geometry: FCN-8s, width 1.0, VOC-sized 375x500 images, batch 1 and a
larger batch, on data already on the device. Each configuration runs in the same
process, one after the other, on a fresh copy of the same weights:

- ``fp32-nchw``: float32, NCHW, the baseline (what pytorch-fcn runs);
- ``fp32-cl``: float32, channels_last;
- ``bf16-nchw``: bfloat16 autocast, NCHW;
- ``bf16-cl``: bfloat16 autocast, channels_last (what ``train.device: cuda`` runs).

Per case: ms/step, images/s and its ratio to ``fp32-nchw`` at the same batch, peak GPU
memory (``torch.cuda.max_memory_allocated``: weights, SGD state, activations), and the
achieved TFLOP/s (FLOPs of one step counted with ``torch.utils.flop_counter`` on the meta
device) next to the device's dense bf16 tensor-core peak, looked up from its name.
Warm-up steps first (cuDNN autotuning, ``torch.backends.cudnn.benchmark = True`` for
every configuration); timings are bracketed by ``torch.cuda.synchronize``. TF32 stays
at PyTorch's defaults (on in cuDNN convolutions, off in matmuls), as a plain float32
training script gets it; the output says so.

    python benchmarks/bench_gpu.py                          # on a GPU, ~1 minute
    python benchmarks/bench_gpu.py --json gpu-bench.json    # the figures as JSON too
    python benchmarks/bench_gpu.py --device cpu --width 0.0625 --size 64x80 \\
        --batches 1,2 --configs fp32-nchw,fp32-cl --min-seconds 0.3   # CPU smoke run

A case that runs out of GPU memory is recorded as such and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

# The library API used here, in one place (training's device helpers may move).
from fcn_pipeline.losses import segmentation_loss
from fcn_pipeline.models import build_fcn, parameter_groups
from fcn_pipeline.runtime import autocast, resolve_device

BASELINE = "fp32-nchw"
CONFIGS = {  # name: (bf16 autocast, channels_last)
    "fp32-nchw": (False, False),
    "fp32-cl": (False, True),
    "bf16-nchw": (True, False),
    "bf16-cl": (True, True),
}
# Dense (no 2:4 sparsity) bf16 tensor-core peaks of NVIDIA's data sheets, TFLOP/s, by
# a part of the name torch reports; the first match wins, so variants come first.
BF16_DENSE_PEAK_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.4),  # SXM
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM5, reported as "NVIDIA H100 80GB HBM3"
    ("A100", 312.0),
)


@dataclass
class Case:
    batch: int
    config: str
    dtype: str
    channels_last: bool
    status: str = "ok"  # ok | out of memory: ...
    steps: int = 0
    ms_per_step: float | None = None
    images_per_second: float | None = None
    speedup_vs_baseline: float | None = None
    peak_memory_mib: float | None = None
    flops_per_step: int | None = None
    tflops: float | None = None
    share_of_bf16_peak: float | None = None


def bf16_peak_tflops(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak of ``device_name``, or None when unknown."""
    name = device_name.lower()
    for part, peak in BF16_DENSE_PEAK_TFLOPS:
        if part.lower() in name:
            return peak
    return None


def step_flops(variant: str, num_classes: int, width: float, upsample: str, shape) -> int:
    """FLOPs of one forward + backward pass, counted on the meta device (no compute)."""
    batch, height, width_px = shape
    with torch.device("meta"):
        model = build_fcn(variant, num_classes, width=width, upsample=upsample)
        images = torch.empty(batch, 3, height, width_px)
        labels = torch.zeros(batch, height, width_px, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops()


def step_context(device: torch.device, bf16: bool) -> Any:
    """The pipeline's own autocast on CUDA; plain bf16 autocast on the CPU when asked
    (the pipeline trains the CPU in float32)."""
    if not bf16:
        return contextlib.nullcontext()
    if device.type == "cuda":
        return autocast(device)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def time_case(base: torch.nn.Module, case: Case, args, device: torch.device, sync) -> None:
    """Run ``case`` on a fresh copy of ``base``; fill in its timing and memory."""
    bf16, channels_last = CONFIGS[case.config]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = copy.deepcopy(base).to(device, memory_format=fmt).train()
    optimizer = torch.optim.SGD(parameter_groups(model, 1e-4, 5e-4), momentum=0.9)
    generator = torch.Generator(device=device).manual_seed(0)
    height, width_px = args.size
    images = torch.randn(case.batch, 3, height, width_px, device=device, generator=generator)
    images = images.contiguous(memory_format=fmt)
    labels = torch.randint(
        0, args.num_classes, (case.batch, height, width_px), device=device, generator=generator
    )

    def step() -> None:
        with step_context(device, bf16):
            scores = model(images)
        loss = segmentation_loss(scores, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not math.isfinite(loss.item()):  # as train_one_epoch: one sync per step
            raise RuntimeError(f"{case.config} batch {case.batch}: loss is not finite")

    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    while case.steps < 1 or (
        case.steps < args.max_steps and time.perf_counter() - start < args.min_seconds
    ):
        step()
        case.steps += 1
    sync()
    seconds = (time.perf_counter() - start) / case.steps
    case.ms_per_step = 1e3 * seconds
    case.images_per_second = case.batch / seconds
    if device.type == "cuda":
        case.peak_memory_mib = torch.cuda.max_memory_allocated(device) / 2**20


def describe_device(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "name": props.name,
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    return {"name": f"CPU ({platform.processor() or platform.machine()})",
            "threads": torch.get_num_threads()}  # fmt: skip


def fmt(value: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


HEADER = (
    f"{'batch':>5} {'config':<10} {'ms/step':>9} {'img/s':>9} {'vs fp32':>8} "
    f"{'peak MiB':>9} {'TFLOP/s':>8} {'of bf16 peak':>12}"
)


def print_row(case: Case) -> None:
    """One case's line, printed as soon as it is measured (a run stopped at its time
    limit keeps the rows it got to)."""
    if case.status != "ok":
        print(f"{case.batch:>5} {case.config:<10} {case.status}", flush=True)
        return
    share = fmt(case.share_of_bf16_peak, ".1%", "unknown")
    print(
        f"{case.batch:>5} {case.config:<10} {case.ms_per_step:>9.2f} "
        f"{case.images_per_second:>9.2f} {fmt(case.speedup_vs_baseline, '.2f'):>7}x "
        f"{fmt(case.peak_memory_mib, ',.0f'):>9} {case.tflops:>8.2f} {share:>12}",
        flush=True,
    )


def run(args) -> dict[str, Any]:
    """Every (batch, config) case; returns what ``--json`` writes."""
    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    info = describe_device(device)
    peak = bf16_peak_tflops(info["name"]) if device.type == "cuda" else None
    height, width_px = args.size
    print(f"device: {info['name']}; torch {torch.__version__}; " + ", ".join(
        f"{k} {v}" for k, v in info.items() if k != "name"))  # fmt: skip
    print(
        f"{args.variant}, width {args.width}, upsample {args.upsample}, {args.num_classes} "
        f"classes, {height}x{width_px} images; train step = forward + loss + backward + "
        f"SGD update + loss.item(); {args.warmup} warm-up steps, then >= {args.min_seconds} s"
    )
    torch.manual_seed(0)
    base = build_fcn(args.variant, args.num_classes, width=args.width, upsample=args.upsample)
    cases: list[Case] = []
    print(HEADER)
    print("-" * len(HEADER), flush=True)
    for batch in args.batches:
        flops = step_flops(
            args.variant, args.num_classes, args.width, args.upsample, (batch, height, width_px)
        )
        baseline_rate = None
        for config in args.configs:
            bf16, channels_last = CONFIGS[config]
            case = Case(batch, config, "bfloat16" if bf16 else "float32", channels_last)
            case.flops_per_step = flops
            try:
                time_case(base, case, args, device, sync)
            except torch.cuda.OutOfMemoryError as error:
                case.status = f"out of memory: {str(error).splitlines()[0]}"
                torch.cuda.empty_cache()
                cases.append(case)
                print_row(case)
                continue
            if config == BASELINE:
                baseline_rate = case.images_per_second
            if baseline_rate:
                case.speedup_vs_baseline = case.images_per_second / baseline_rate
            case.tflops = flops / (case.ms_per_step / 1e3) / 1e12
            if peak:
                case.share_of_bf16_peak = case.tflops / peak
            cases.append(case)
            print_row(case)
    print(f"dense bf16 peak of this device: {fmt(peak, '.1f', 'unknown')} TFLOP/s")
    return {
        "device": info,
        "torch": torch.__version__,
        "bf16_dense_peak_tflops": peak,
        "settings": {
            "variant": args.variant,
            "width": args.width,
            "upsample": args.upsample,
            "num_classes": args.num_classes,
            "height": height,
            "width_px": width_px,
            "warmup_steps": args.warmup,
            "min_seconds": args.min_seconds,
            "baseline": BASELINE,
        },
        "cases": [asdict(case) for case in cases],
    }


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 375x500, got {text!r}") from None
    return height, width


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    parser.add_argument("--variant", default="fcn8s", choices=["fcn32s", "fcn16s", "fcn8s"])
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier")
    parser.add_argument("--upsample", default="frozen", choices=["frozen", "learned", "interp"])
    parser.add_argument("--num-classes", type=int, default=21, help="21: PASCAL VOC")
    parser.add_argument("--size", type=parse_size, default=(375, 500), help="HxW")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated, from {', '.join(CONFIGS)} ({BASELINE} first: the baseline)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per case")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="timed seconds per case")
    parser.add_argument("--max-steps", type=int, default=500, help="timed steps at most")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.configs = args.configs.split(",")
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or args.configs[0] != BASELINE:
        parser.error(f"--configs: unknown {unknown} or not starting with {BASELINE}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        tmp = args.json.with_name(f".{args.json.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
