"""Training-step cost of FCN's network geometry and normalisation: paper vs same, none vs batch.

Times one training step (forward, per-pixel cross-entropy, backward, Adam update) of
FCN-8s with ``geometry`` paper (conv1_1 padded by 100) or same (no extra padding) and
``norm`` none or batch, at each ``--widths``, on a CPU with ``--threads`` threads and
channels_last, and prints ms/image and the ratio to the paper/none net of the same width.
The configurations take turns, one step each, ``--repeats`` times, and each reports its
median step in wall-clock and in process CPU time (all threads), so a shared CPU's load
falls on all of them alike; CPU time is the steadier of the two on a busy machine.
GFLOP/image (counted on the meta device) and conv1's map size say where the time goes.

``--compile`` also times ``torch.compile(model)`` (inductor) for the same step: the
compile time (the first step, minus a steady step) separately, then steady-state ms/image.

    .venv/bin/python benchmarks/bench_geometry.py              # ~1-3 min on a 2-core CPU
    .venv/bin/python benchmarks/bench_geometry.py --threads 1  # steadier on a busy machine
    .venv/bin/python benchmarks/bench_geometry.py --compile    # + 3-5 min a config, busy CPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fcn_pipeline.models import build_fcn, parameter_groups

NUM_CLASSES = 21


@dataclass(frozen=True)
class Config:
    width: float
    geometry: str
    norm: str

    @property
    def label(self) -> str:
        return f"{self.width:<7g} {self.geometry:<6} {self.norm:<6}"


def make_step(model: nn.Module, batch: int, height: int, width: int) -> Callable[[], None]:
    """One training step on a fixed random batch: forward, loss, backward, Adam update."""
    torch.manual_seed(0)
    for name, module in model.named_modules():
        if name.startswith("score_"):  # zero scores would leave the backbone without gradient
            nn.init.normal_(module.weight, std=0.01)
    images = torch.randn(batch, 3, height, width).to(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (batch, height, width))
    optimizer = torch.optim.Adam(parameter_groups(model, 1e-4, 5e-4))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    model.train()
    return step


def build(config: Config, variant: str, upsample: str) -> nn.Module:
    model = build_fcn(
        variant,
        NUM_CLASSES,
        width=config.width,
        upsample=upsample,
        geometry=config.geometry,
        norm=config.norm,
    )
    return model.to(memory_format=torch.channels_last)


def flops_per_image(config: Config, variant: str, upsample: str, size: tuple[int, int]) -> float:
    """Forward + backward FLOPs of one image, counted from the ops' shapes (no compute)."""
    with torch.device("meta"):
        model = build(config, variant, upsample)
        images = torch.empty(1, 3, *size)
        labels = torch.zeros(1, *size, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops()


def conv1_pixels(config: Config, size: tuple[int, int]) -> tuple[int, int]:
    """conv1_1's output size: the input plus twice its padding, less 2."""
    pad = 100 if config.geometry == "paper" else 1
    return size[0] + 2 * pad - 2, size[1] + 2 * pad - 2


@dataclass(frozen=True)
class Timing:
    wall: float  # median seconds per step
    cpu: float  # median process CPU seconds per step (all threads)


def timed_rounds(steps: dict[Config, Callable[[], None]], repeats: int) -> dict[Config, Timing]:
    """Median wall and CPU seconds per step of each configuration, one step of each in
    turn, ``repeats`` times: load on a shared CPU then falls on all of them alike."""
    wall: dict[Config, list[float]] = {config: [] for config in steps}
    cpu: dict[Config, list[float]] = {config: [] for config in steps}
    for _ in range(repeats):
        for config, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            wall[config].append(time.perf_counter() - start)
            cpu[config].append(time.process_time() - start_cpu)
    return {
        config: Timing(statistics.median(wall[config]), statistics.median(cpu[config]))
        for config in steps
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="fcn8s")
    parser.add_argument("--upsample", default="frozen", choices=("frozen", "learned", "interp"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128, help="image width in pixels")
    parser.add_argument("--widths", type=float, nargs="+", default=[0.0625, 0.125])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    size = (args.height, args.width)
    configs = [
        Config(w, geometry, norm)
        for w in args.widths
        for geometry in ("paper", "same")
        for norm in ("none", "batch")
    ]
    print(
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; {args.variant}, "
        f"upsample={args.upsample}, batch {args.batch} x 3 x {args.height} x {args.width}, "
        f"float32, channels_last; forward + cross-entropy + backward + Adam; "
        f"median of {args.repeats} steps"
    )
    steps = {}
    for config in configs:
        steps[config] = make_step(build(config, args.variant, args.upsample), args.batch, *size)
        steps[config]()  # warm-up: allocations, oneDNN primitives
    eager = timed_rounds(steps, args.repeats)
    compiled, compile_seconds = {}, {}
    if args.compile:
        compiled, compile_seconds = time_compiled(configs, args, size)
    print_table(configs, eager, compiled, compile_seconds, args, size)


def time_compiled(
    configs: list[Config], args: argparse.Namespace, size: tuple[int, int]
) -> tuple[dict[Config, Timing], dict[Config, float]]:
    """Steady-state timings of ``torch.compile(model)`` steps, and each one's compile time
    (its first step less a steady one)."""
    torch._dynamo.config.cache_size_limit = max(64, 4 * len(configs))  # one entry per config
    steps, first = {}, {}
    for config in configs:
        model = torch.compile(build(config, args.variant, args.upsample))
        steps[config] = make_step(model, args.batch, *size)
        start = time.perf_counter()
        steps[config]()  # traces and compiles forward and backward
        first[config] = time.perf_counter() - start
    timings = timed_rounds(steps, args.repeats)
    return timings, {config: first[config] - timings[config].wall for config in configs}


def print_table(
    configs: list[Config],
    eager: dict[Config, Timing],
    compiled: dict[Config, Timing],
    compile_seconds: dict[Config, float],
    args: argparse.Namespace,
    size: tuple[int, int],
) -> None:
    header = f"{'width':<7} {'geom':<6} {'norm':<6} {'conv1 map':>10} {'GFLOP/img':>10} "
    header += f"{'ms/img':>8} {'ratio':>6} {'cpu ms/img':>11} {'cpu ratio':>10}"
    if compiled:
        header += f" {'compile s':>10} {'c ms/img':>9} {'c ratio':>8} {'c cpu ratio':>12}"
    print(header)
    for config in configs:
        base = eager[Config(config.width, "paper", "none")]
        flops = flops_per_image(config, args.variant, args.upsample, size) / 1e9
        h1, w1 = conv1_pixels(config, size)
        line = f"{config.label} {f'{h1}x{w1}':>10} {flops:>10.3f} "
        line += _columns(eager[config], base, args.batch)
        if compiled:
            c = compiled[config]
            line += f" {compile_seconds[config]:>10.1f} {1000 * c.wall / args.batch:>9.1f}"
            line += f" {c.wall / base.wall:>8.2f} {c.cpu / base.cpu:>12.2f}"
        print(line)
    print("ratio: step time / eager paper+none step time of the same width; cpu: process CPU")
    if compiled:
        print("c: torch.compile (inductor), steady state; compile s: first step less a steady one")


def _columns(timing: Timing, base: Timing, batch: int) -> str:
    ms, cpu_ms = 1000 * timing.wall / batch, 1000 * timing.cpu / batch
    return (
        f"{ms:>8.1f} {timing.wall / base.wall:>6.2f} {cpu_ms:>11.1f} {timing.cpu / base.cpu:>10.2f}"
    )


if __name__ == "__main__":
    main()
