"""Where and how a net runs: device choice, determinism, threads, mixed precision,
and the prediction loop shared by validation (training) and evaluation.

On CUDA the nets run under bfloat16 autocast with channels_last tensors (cuDNN's
fast path), cuDNN's autotuner choosing each convolution's algorithm; on the CPU
channels_last too (oneDNN's NHWC convolutions train the default width-0.0625 FCN-8s
1.24x faster and predict 1.4-1.7x faster), with deterministic kernels so that the
same params, seed, thread count and processor give the same weights. CPU training
runs under bfloat16 autocast where the processor computes bfloat16 natively
(AVX512-BF16 or AMX: oneDNN's bf16 convolutions, float32 accumulation) and in
float32 elsewhere (``train.precision: auto``); CPU evaluation stays float32. On AMX the
upsampling layers leave autocast (:mod:`fcn_pipeline.models.upsample`).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fcn_pipeline.config import Precision
from fcn_pipeline.errors import ConfigError
from fcn_pipeline.metrics import confusion_matrix
from fcn_pipeline.models.upsample import amx_cpu


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed the RNGs that training touches (torch CPU/CUDA, numpy)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


@contextmanager
def torch_threads(threads: int = 0) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (0: leave the count alone)."""
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)


@contextmanager
def kernel_settings(device: torch.device, threads: int = 0) -> Iterator[None]:
    """How training runs its kernels, restored afterwards: on the CPU deterministic
    kernels and ``threads`` CPU threads, so that the same params and seed give the same
    weights; on CUDA cuDNN's autotuner (``torch.backends.cudnn.benchmark``) over all of
    its algorithms. A CUDA run is not bit-for-bit repeatable anyway (bfloat16 autocast,
    atomic adds in the backward pass of upsampling), and restricting cuDNN to its
    deterministic algorithms without autotuning cost the real training step most of its
    speed (see ``benchmarks/bench_training.py --compare-kernels``)."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_benchmark = torch.backends.cudnn.benchmark
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True
    try:
        with torch_threads(threads):
            yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
        torch.backends.cudnn.benchmark = was_benchmark


@cache
def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles), where
    oneDNN's bf16 kernels beat float32; elsewhere bf16 is emulated and slower."""
    probes = [
        getattr(torch.cpu, name, None)
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    if all(probe is not None for probe in probes):
        return any(probe() for probe in probes)
    try:  # an older torch: the kernel's flags
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def machine_description() -> str:
    """The processor a CPU run trains on, e.g. ``AMD EPYC 9R14 (2 cores, AVX512, native
    bf16)``: its model name, cores, oneDNN's instruction-set family, bf16 and AMX."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    extras = [", native bf16" if native_bf16() else "", ", AMX" if amx_cpu() else ""]
    name = names[0] if names else platform.processor() or platform.machine()
    return f"{name} ({os.cpu_count()} cores, {cpu_capability()}{''.join(extras)})"


def cpu_capability() -> str:
    """The instruction-set family oneDNN and ATen dispatch on (e.g. ``AVX512``)."""
    return str(torch.backends.cpu.get_cpu_capability())


def training_dtype(device: torch.device, precision: Precision = "auto") -> torch.dtype:
    """The autocast dtype a training step runs in: ``auto`` is bfloat16 on CUDA and on
    a CPU with native bf16 (:func:`native_bf16`), float32 elsewhere."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    if device.type == "cuda" or (device.type == "cpu" and native_bf16()):
        return torch.bfloat16
    return torch.float32


def eval_dtype(device: torch.device) -> torch.dtype:
    """Prediction: bfloat16 on CUDA, float32 on the CPU (exact scores)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Autocast to ``dtype`` (default :func:`eval_dtype`); float32 means none."""
    dtype = eval_dtype(device) if dtype is None else dtype
    return torch.autocast(
        device_type=device.type,
        dtype=dtype if dtype != torch.float32 else torch.bfloat16,
        enabled=dtype != torch.float32,
    )


def dtype_name(dtype: torch.dtype) -> str:
    """``bf16`` / ``fp32``: how logs, DVCLive and model files name a precision."""
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dtype]


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A ``(N, 3, H, W)`` image batch on ``device``, laid out channels_last."""
    x = images.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def predict_batches(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    num_classes: int,
    device: torch.device,
    keep: set[int] | frozenset[int] = frozenset(),
    per_image: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[int, np.ndarray]]:
    """The ``(K, K)`` int64 confusion histogram of ``model`` over ``loader`` (on CPU),
    and the ``(H, W)`` uint8 predictions of the dataset indices in ``keep``.
    ``per_image``, when given, is filled with each image's own ``(K, K)`` histogram.

    ``loader`` must come from :func:`fcn_pipeline.data.eval_loader` (its batch
    sampler names the dataset indices of each batch).
    """
    model.eval()
    hist = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
    kept: dict[int, np.ndarray] = {}
    for indices, batch in zip(loader.batch_sampler, loader, strict=True):
        with autocast(device):
            pred = model(to_device(batch.images, device)).argmax(dim=1)
        masks = batch.masks.to(device, non_blocking=True)
        hist += confusion_matrix(pred, masks, num_classes)
        for position, index in enumerate(indices):
            if per_image is not None:  # one image at a time: K x K counts, no pixel loop
                per_image[index] = confusion_matrix(
                    pred[position], masks[position], num_classes
                ).cpu()
            if index in keep:
                kept[index] = pred[position].to(torch.uint8).cpu().numpy()
    return hist.cpu(), kept


__all__ = [
    "autocast",
    "cpu_capability",
    "dtype_name",
    "eval_dtype",
    "kernel_settings",
    "native_bf16",
    "predict_batches",
    "resolve_device",
    "seed_everything",
    "to_device",
    "torch_threads",
    "training_dtype",
]
