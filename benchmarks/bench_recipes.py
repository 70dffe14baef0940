"""Training recipes compared by what matters: validation mean IU per wall-clock minute.

In one run, on the default synthetic data (ingested and counted once into ``--cache``):

1. **speed**: for every recipe, images/s of one real epoch of the default FCN-8s
   (``train_variant``, at once from the backbone, so each recipe trains the same net):
   loader, flips, forward, loss, backward and optimizer step, as the pipeline runs them.
2. **accuracy at equal wall time** (the recipes named by ``--accuracy``): the staged
   FCN-32s -> 16s -> 8s of each recipe with as many epochs as phase 1's speed fits in
   ``--budget`` seconds (a tenth each for FCN-32s and FCN-16s, the rest for FCN-8s; the
   poly schedule decays over exactly those), then FCN-8s's validation mean IU (last and
   best epoch) and the minutes it really took.

A recipe is a set of ``train.*`` overrides. ``today`` is the recipe before this
benchmark (batch 2, float32, PNGs decoded by a loader process in every epoch);
larger batches scale Adam's learning rate by the square root of the batch ratio.
``--compile`` also times ``torch.compile`` of the best recipe's step: compile seconds
and images/s after it, with Inductor's persistent cache in ``--cache``.

    .venv/bin/python benchmarks/bench_recipes.py                 # ~25 min on 2 cores
    .venv/bin/python benchmarks/bench_recipes.py --budget 120 --accuracy today b16-bf16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from fcn_pipeline.config import load_params
from fcn_pipeline.runtime import native_bf16
from fcn_pipeline.training import train_variant

TODAY = {"batch_size": 2, "lr": 3e-3, "precision": "fp32", "preload_mb": 0, "workers": 1}
RECIPES: dict[str, dict] = {
    "today": TODAY,
    "b2-preload": {**TODAY, "preload_mb": 2048, "workers": 0},
    "b2-preload-bf16": {**TODAY, "preload_mb": 2048, "workers": 0, "precision": "bf16"},
    "b8-bf16": {"batch_size": 8, "lr": 6e-3, "precision": "bf16", "preload_mb": 2048},
    "b16-fp32": {"batch_size": 16, "lr": 8.5e-3, "precision": "fp32", "preload_mb": 2048},
    "b16-bf16": {"batch_size": 16, "lr": 8.5e-3, "precision": "bf16", "preload_mb": 2048},
    "b16-bf16-lr3e-3": {"batch_size": 16, "lr": 3e-3, "precision": "bf16", "preload_mb": 2048},
    "b32-bf16": {"batch_size": 32, "lr": 1.2e-2, "precision": "bf16", "preload_mb": 2048},
}


def prepared_data(params, cache: Path) -> Path:
    """Ingest + stats of the default ``data`` params into ``cache`` (once)."""
    from fcn_pipeline.ingest import ingest
    from fcn_pipeline.stats import count_classes, write_stats

    root = cache / "data"
    if not (root / "stats" / "stats.json").exists():
        ingest(params.data, root / "ingested")
        write_stats(count_classes(root / "ingested", 0), root / "stats")
    return root


def recipe_params(base, root: Path, out: Path, recipe: dict, threads: int):
    return base.model_copy(
        update={
            "data": str(root / "ingested"),
            "stats": str(root / "stats"),
            "out": str(out),
            "threads": threads,
            "device": "cpu",
            **recipe,
        }
    )


def speed(base, root: Path, cache: Path, name: str, threads: int) -> float:
    """Images/s of one epoch of the at-once FCN-8s under recipe ``name``."""
    params = recipe_params(base, root, cache / "speed" / name, RECIPES[name], threads)
    params = params.model_copy(update={"at_once": True})
    result = train_variant(params, "fcn8s", 1, log=lambda _: None)
    return result.history[-1]["images_per_second"]


def accuracy(base, root: Path, cache: Path, name: str, epochs: dict, threads: int) -> dict:
    """Staged training of recipe ``name`` for ``epochs``: FCN-8s's validation scores."""
    params = recipe_params(base, root, cache / "accuracy" / name, RECIPES[name], threads)
    start = time.perf_counter()
    for variant in ("fcn32s", "fcn16s", "fcn8s"):
        result = train_variant(params, variant, epochs[variant], log=lambda _: None)
    curve = [h["val_mean_iu"] for h in result.history]
    return {
        "epochs": epochs,
        "minutes": (time.perf_counter() - start) / 60,
        "val_mean_iu_last": curve[-1],
        "val_mean_iu_best": max(curve),
        "curve": [round(value, 4) for value in curve],
    }


def split_epochs(total: int) -> dict[str, int]:
    coarse = max(1, round(total / 10))
    return {"fcn32s": coarse, "fcn16s": coarse, "fcn8s": max(1, total - 2 * coarse)}


def compile_cost(base, root: Path, cache: Path, name: str, threads: int) -> dict:
    """Seconds to compile the training step of recipe ``name`` and images/s after."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    from fcn_pipeline.data import SegmentationDataset, pad_collate
    from fcn_pipeline.losses import SegmentationCriterion
    from fcn_pipeline.models import build_fcn, parameter_groups

    recipe = RECIPES[name]
    torch.set_num_threads(threads)
    dataset = SegmentationDataset(root / "ingested", "train")
    batch = pad_collate([dataset[i] for i in range(recipe["batch_size"])])
    x = batch.images.contiguous(memory_format=torch.channels_last)
    model = build_fcn(
        "fcn8s",
        dataset.num_classes,
        width=base.width,
        geometry=base.geometry,
        norm=base.norm,
        upsample=base.upsample,
    )
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(parameter_groups(model, recipe["lr"], base.weight_decay))
    criterion = SegmentationCriterion(cell_size=model.output_stride)
    compiled = torch.compile(model)
    dtype = torch.bfloat16 if recipe["precision"] == "bf16" else torch.float32

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = compiled(x)
        loss = criterion(logits, batch.masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    tick = time.perf_counter()
    step()
    seconds = time.perf_counter() - tick
    step()
    tick = time.perf_counter()
    steps = 12
    for _ in range(steps):
        step()
    rate = steps * len(batch.ids) / (time.perf_counter() - tick)
    return {"compile_seconds": seconds, "images_per_second": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--cache", default="/tmp/fcn-bench-recipes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds")
    parser.add_argument("--speed", nargs="*", default=list(RECIPES))
    parser.add_argument(
        "--accuracy", nargs="*", default=["today", "b8-bf16", "b16-bf16", "b16-bf16-lr3e-3"]
    )
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()

    base = load_params(args.params)
    cache = Path(args.cache)
    root = prepared_data(base, cache)
    train_images = base.data.synthetic.splits["train"]
    print(
        f"CPU: {torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16()}, "
        f"{args.threads} threads, {train_images} training images",
        flush=True,
    )
    figures: dict = {"threads": args.threads, "budget_s": args.budget, "speed": {}, "accuracy": {}}
    for name in args.speed:
        rate = speed(base.train, root, cache, name, args.threads)
        figures["speed"][name] = rate
        ratio = rate / figures["speed"].get("today", rate)
        print(
            f"speed {name:18s} {rate:7.1f} img/s  {ratio:4.2f}x today  {RECIPES[name]}", flush=True
        )
    for name in args.accuracy:
        total = max(3, math.floor(args.budget * figures["speed"][name] / train_images))
        row = accuracy(base.train, root, cache, name, split_epochs(total), args.threads)
        figures["accuracy"][name] = row
        print(
            f"accuracy {name:18s} epochs {row['epochs']}: FCN-8s val mean IU last "
            f"{row['val_mean_iu_last']:.4f}, best {row['val_mean_iu_best']:.4f}, "
            f"{row['minutes']:.1f} min",
            flush=True,
        )
    if args.compile:
        best = max(args.speed, key=lambda name: figures["speed"][name])
        figures["compile"] = {best: compile_cost(base.train, root, cache, best, args.threads)}
        row = figures["compile"][best]
        print(
            f"compile {best}: {row['compile_seconds']:.1f} s to compile, then "
            f"{row['images_per_second']:.1f} img/s (eager {figures['speed'][best]:.1f})"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
