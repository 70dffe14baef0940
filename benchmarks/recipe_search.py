"""Measure training recipes for the default budget: staged FCN-32s -> 16s -> 8s per trial.

Each trial is a set of dotted overrides of ``params.yaml`` (as ``dvc exp run -S``
takes them). The trial's dataset is ingested (and counted) once into a cache
keyed by the ``data`` params, then the three nets are trained in turn with
:func:`fcn_pipeline.training.train_variant`; the script prints and appends one
JSON line per trial: the validation mean IU after each stage, FCN-8s's best and
final validation mean IU, the curve, and the training minutes.

    python benchmarks/recipe_search.py --trials trials.yaml --out results.jsonl --threads 1

``trials.yaml``: a list of ``{name: ..., overrides: {key: value, ...}}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import yaml

from fcn_pipeline.config import load_params
from fcn_pipeline.ingest import ingest
from fcn_pipeline.stats import count_classes, write_stats
from fcn_pipeline.training import train_variant


def prepared_data(params, cache: Path) -> Path:
    """Ingest + stats of ``params.data`` into ``cache/<hash>`` (reused across trials)."""
    key = hashlib.sha256(params.data.model_dump_json().encode()).hexdigest()[:12]
    root = cache / f"data-{key}"
    if not (root / "stats" / "stats.json").exists():
        ingest(params.data, root / "ingested")
        write_stats(count_classes(root / "ingested", 0), root / "stats")
    return root


def run_trial(name: str, overrides: dict, args: argparse.Namespace) -> dict:
    params = load_params(args.params, overrides)
    root = prepared_data(params, Path(args.cache))
    out = Path(args.cache) / "runs" / name
    train = params.train.model_copy(
        update={
            "data": str(root / "ingested"),
            "stats": str(root / "stats"),
            "out": str(out),
            "threads": args.threads,
            "workers": args.workers,
        }
    )
    result: dict = {"name": name, "overrides": overrides, "stages": {}}
    start = time.perf_counter()
    for variant in ("fcn32s", "fcn16s", "fcn8s"):
        tick = time.perf_counter()
        trained = train_variant(train, variant, getattr(params.epochs, variant), log=lambda _: None)
        curve = [round(h["val_mean_iu"], 4) for h in trained.history]
        result["stages"][variant] = {
            "minutes": round((time.perf_counter() - tick) / 60, 2),
            "val_mean_iu": curve[-1] if curve else None,
            "best": max(curve) if curve else None,
            "curve": curve,
            "images_per_second": round(trained.history[-1]["images_per_second"], 1)
            if trained.history
            else None,
        }
    result["minutes"] = round((time.perf_counter() - start) / 60, 2)
    result["fcn8s_val_mean_iu"] = result["stages"]["fcn8s"]["val_mean_iu"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", required=True, help="YAML list of {name, overrides}")
    parser.add_argument("--only", nargs="*", help="run only these trial names")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--cache", default="/tmp/fcn-recipe")
    parser.add_argument("--out", default="recipe-results.jsonl")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    trials = yaml.safe_load(Path(args.trials).read_text())
    for trial in trials:
        if args.only and trial["name"] not in args.only:
            continue
        result = run_trial(trial["name"], trial.get("overrides") or {}, args)
        line = json.dumps(result)
        print(
            f"{result['name']}: FCN-8s val mean IU {result['fcn8s_val_mean_iu']} "
            f"(best {result['stages']['fcn8s']['best']}), "
            f"32s {result['stages']['fcn32s']['val_mean_iu']}, "
            f"16s {result['stages']['fcn16s']['val_mean_iu']}, {result['minutes']} min",
            flush=True,
        )
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
