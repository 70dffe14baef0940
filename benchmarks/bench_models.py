"""Training-step speed of FCN-32s/16s/8s: images/s and achieved FLOP/s.

Times forward + backward steps (per-pixel cross-entropy against random labels, train mode)
of each variant at the paper's width on 1x3x256x256 and at a CPU width on 4x3x128x128, on
cuda if available, else the CPU. FLOPs per step are counted from the ops' shapes with
torch.utils.flop_counter on the meta device (no compute), and set against the FLOP/s
of a large torch.mm measured in the same run.

    .venv/bin/python benchmarks/bench_models.py            # ~2-3 min on a 2-core CPU
    .venv/bin/python benchmarks/bench_models.py --quick    # seconds: CPU width only on a CPU

On cuda, steps run in bfloat16 autocast with channels_last, cuDNN autotuning and TF32;
on the CPU in float32 with channels_last (oneDNN); ``--bf16`` forces bfloat16 autocast on
the CPU (fast only with AMX).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fcn_pipeline.models import build_fcn


@dataclass(frozen=True)
class Case:
    variant: str
    width: float
    batch: int
    size: int


def step_flops(case: Case, num_classes: int, upsample: str) -> int:
    """FLOPs of one forward + backward step, counted on the meta device."""
    with torch.device("meta"):
        model = build_fcn(case.variant, num_classes, width=case.width, upsample=upsample)
        images = torch.empty(case.batch, 3, case.size, case.size)
        labels = torch.zeros(case.batch, case.size, case.size, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops()


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, n: int, sync) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    sync()
    repeats, start = 0, time.perf_counter()
    while repeats < 3 or time.perf_counter() - start < 1.0:
        a @ b
        sync()
        repeats += 1
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def seconds_per_step(
    step: Callable[[], None], warmup: int, min_seconds: float, max_steps: int, sync
) -> float:
    for _ in range(warmup):
        step()
    sync()
    steps, start = 0, time.perf_counter()
    while steps < 1 or (steps < max_steps and time.perf_counter() - start < min_seconds):
        step()
        sync()
        steps += 1
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer, shorter cases")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--cpu-width", type=float, default=0.125)
    parser.add_argument("--upsample", default="frozen", choices=("frozen", "learned", "interp"))
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast on the CPU too")
    parser.add_argument("--num-classes", type=int, default=21)
    args = parser.parse_args()

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    use_bf16 = on_gpu or args.bf16
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    if on_gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    variants = ("fcn32s", "fcn16s", "fcn8s")
    cases = [Case(v, args.cpu_width, 4, 128) for v in variants]
    if on_gpu or not args.quick:
        cases = [Case(v, 1.0, 1, 256) for v in variants] + cases
    # A full-width step takes ~20 s on a 2-core CPU: one warm-up (backbone kernels and
    # allocations are shared by the variants) and one timed step each keep the run short.
    slow = not on_gpu
    min_seconds = 0.5 if args.quick else 2.0

    name = (
        torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"device: {name}; torch {torch.__version__}; {dtype}; channels_last; "
          f"upsample={args.upsample}; forward+backward, train mode")  # fmt: skip
    mm_size = 8192 if on_gpu else 2048
    peak = matmul_flops_per_second(device, dtype, mm_size, sync)
    print(f"torch.mm {mm_size}x{mm_size} {dtype}: {peak / 1e9:,.1f} GFLOP/s")
    header = (
        f"{'variant':<8} {'width':>6} {'input':>13} {'ms/step':>9} {'img/s':>8} "
        f"{'GFLOP/step':>11} {'GFLOP/s':>9} {'of mm':>6}"
    )
    print(header)
    print("-" * len(header))

    warmed_up: set[float] = set()
    for case in cases:
        flops = step_flops(case, args.num_classes, args.upsample)
        model = build_fcn(case.variant, args.num_classes, width=case.width, upsample=args.upsample)
        model = model.to(device, memory_format=torch.channels_last).train()
        images = torch.randn(case.batch, 3, case.size, case.size, device=device)
        images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(
            0, args.num_classes, (case.batch, case.size, case.size), device=device
        )
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if use_bf16
            else contextlib.nullcontext()
        )

        def step(model=model, images=images, labels=labels, autocast=autocast) -> None:
            with autocast:
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            model.zero_grad(set_to_none=True)

        full_width_on_cpu = slow and case.width == 1.0
        warmup = 0 if full_width_on_cpu and case.width in warmed_up else 1
        warmed_up.add(case.width)
        seconds = seconds_per_step(
            step,
            warmup=warmup,
            min_seconds=0.0 if full_width_on_cpu else min_seconds,
            max_steps=1 if full_width_on_cpu else 50,
            sync=sync,
        )
        achieved = flops / seconds
        shape = f"{case.batch}x3x{case.size}x{case.size}"
        print(
            f"{case.variant:<8} {case.width:>6g} {shape:>13} {seconds * 1e3:>9,.0f} "
            f"{case.batch / seconds:>8,.2f} {flops / 1e9:>11,.1f} {achieved / 1e9:>9,.1f} "
            f"{achieved / peak:>6.0%}"
        )
        del model, images, labels, step


if __name__ == "__main__":
    main()
