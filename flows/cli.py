"""``fcn-pipeline``: one subcommand per stage, each running the stage's Prefect flow.

Options default to ``params.yaml``; any option given on the command line
overrides the matching key for this run only. Parameters are validated before
any flow starts, so a bad key fails in well under a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from fcn_pipeline.config import load_params
from fcn_pipeline.errors import PipelineError


def _ingest(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    from flows.ingest import ingest_flow

    return ingest_flow(params_file=args.params, overrides=overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcn-pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: %(default)s)")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    ingest = stages.add_parser("ingest", help="read a dataset into versioned Parquet shards")
    ingest.add_argument("--format", dest="data.format", choices=["synthetic", "camvid", "voc", "folder"])
    ingest.add_argument("--root", dest="data.root", help="source dataset directory")
    ingest.add_argument("--out", dest="data.out", help="output directory")
    ingest.add_argument("--shard-size", dest="data.shard_size", type=int, help="images per shard")
    ingest.add_argument("--workers", dest="data.workers", type=int, help="processes (0 = all cores)")
    ingest.set_defaults(run=_ingest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        key: value for key, value in vars(args).items() if "." in key and value is not None
    }
    run: Callable[[argparse.Namespace, dict[str, Any]], Any] = args.run
    try:
        load_params(args.params, overrides)  # fail fast, before Prefect starts
        run(args, overrides)
    except PipelineError as error:
        print(f"fcn-pipeline {args.stage}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
