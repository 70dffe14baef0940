"""``fcn-pipeline``: one subcommand per stage, each running the stage's Prefect flow.

Options default to ``params.yaml``; any option given on the command line
overrides the matching key for this run only. Parameters are validated before
any flow starts, so a bad key fails in well under a second.

A failure, whatever its cause, ends in one line on stderr,
``fcn-pipeline <stage>: error: <what, which file or key>``, and exit status 1
(130 when interrupted). The traceback goes to the Prefect run's log, and to the
terminal only with ``--debug`` or ``FCN_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from fcn_pipeline.errors import ConfigError, PipelineError


def _ingest(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    from flows.ingest import ingest_flow

    return ingest_flow(params_file=args.params, overrides=overrides)


def _stats(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    from flows.stats import stats_flow

    return stats_flow(params_file=args.params, overrides=overrides)


def _patches(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    from flows.patches import patches_flow

    return patches_flow(params_file=args.params, overrides=overrides)


def _train(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    from flows.train import train_stage

    return train_stage(args.variant, args.params, overrides, args.argv)


def _evaluate(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    from flows.evaluate import evaluate_flow

    return evaluate_flow(variant=args.variant, params_file=args.params, overrides=overrides)


def _study(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    from fcn_pipeline.study import load_study

    load_study(args.study_file, args.params)  # refuse bad input before Prefect starts
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: run at least one experiment at a time")
    if args.jobs > 1:  # lanes are clones of HEAD: refuse uncommitted changes up front
        from flows.study_driver import check_committed

        check_committed(os.getcwd())
    from flows.study import study_flow

    return study_flow(
        study_file=args.study_file, params_file=args.params, reports=args.reports, jobs=args.jobs
    )


def _predict(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    """A plain program: the library's predict, no params.yaml, no Prefect."""
    import json

    from fcn_pipeline.predict import describe, predict

    if args.info:
        print(json.dumps(describe(args.model), indent=2))
        return None
    if not args.inputs or not args.out:
        raise ConfigError("predict: give INPUT files, directories or globs and --out DIR")
    result = predict(
        args.model, args.inputs, args.out, tile=args.tile, overlap=args.overlap,
        flip=args.flip, overlay=args.overlay, batch_size=args.batch_size, device=args.device,
        keep_going=args.keep_going, log=lambda line: print(line, file=sys.stderr),
    )  # fmt: skip
    if result.failed:
        raise PipelineError(f"{len(result.failed)} input(s) failed (listed above)")
    return result


def _export(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    from fcn_pipeline.export import export

    path = export(args.model, args.format, args.out)
    print(f"wrote {path}", file=sys.stderr)
    return path


def _add_predict(stages: Any) -> None:
    predict = stages.add_parser(
        "predict", help="class masks of new images with a trained model.pt or .onnx"
    )
    option = predict.add_argument
    option("model", metavar="MODEL", help="models/<variant>/model.pt or an exported .onnx")
    option("inputs", nargs="*", metavar="INPUT", help="image files, directories, glob patterns")
    option("--out", metavar="DIR", help="writes DIR/<relative path>.png (palette PNG masks)")
    option("--info", action="store_true", help="print what MODEL records and exit")
    option("--overlay", action="store_true", help="also <name>.overlay.jpg with a legend")
    option("--tile", type=int, metavar="PX", help="sliding window side for large images")
    option("--overlap", type=int, default=0, metavar="PX", help="window overlap (with --tile)")
    option("--flip", action="store_true", help="average with the mirrored image's scores")
    option("--batch-size", type=int, default=8, metavar="N", help="same-size images per pass")
    option("--device", default="auto", choices=["auto", "cpu", "cuda"])
    option("--keep-going", action="store_true", help="skip bad inputs, list them, exit 1")
    predict.set_defaults(run=_predict, plain=True)


def _add_export(stages: Any) -> None:
    export = stages.add_parser("export", help="a trained model.pt as ONNX or TorchScript")
    option = export.add_argument
    option("model", metavar="MODEL", help="models/<variant>/model.pt")
    option("--format", required=True, choices=["onnx", "torchscript"])
    option("--out", required=True, metavar="FILE", help="the file to write")
    export.set_defaults(run=_export, plain=True)


# What an interrupted study leaves (a stage's own outputs are atomic, a study's are not):
# experiments that finished are DVC experiments; the one running was cut short.
STUDY_INTERRUPTED = (
    "interrupted; the experiments that finished are kept (dvc exp show) and a rerun skips "
    "them; the one that was running is lost, and with --jobs 1 the workspace holds "
    "outputs of the experiments run (DVC removed the cut one's): `git checkout -- . && "
    "dvc checkout` restores the committed outputs (the train stages' checkpoint.pt is not "
    "cached, so their next `dvc repro` retrains)"
)


def _add_ingest(stages: Any) -> None:
    ingest = stages.add_parser("ingest", help="read a dataset into versioned Parquet shards")
    option = ingest.add_argument
    option("--format", dest="data.format", choices=["synthetic", "camvid", "voc", "folder"])
    option("--root", dest="data.root", help="source dataset directory")
    option("--out", dest="data.out", help="output directory")
    option("--shard-size", dest="data.shard_size", type=int, help="images per shard")
    option("--workers", dest="data.workers", type=int, help="processes (0 = all cores)")
    ingest.set_defaults(run=_ingest)


def _add_stats(stages: Any) -> None:
    stats = stages.add_parser("stats", help="per-class pixel statistics and class weights")
    option = stats.add_argument
    option("--data", dest="stats.data", metavar="INGESTED_DIR", help="ingested dataset")
    option("--out", dest="stats.out", metavar="DIR", help="output directory")
    option("--workers", dest="stats.workers", type=int, metavar="N", help="processes (0 = all)")
    stats.set_defaults(run=_stats)


def _add_patches(stages: Any) -> None:
    patches = stages.add_parser("patches", help="cut training patches from the train split")
    option = patches.add_argument
    option("--data", dest="patches.data", metavar="INGESTED_DIR", help="ingested dataset")
    option("--stats", dest="patches.stats", metavar="STATS_DIR", help="stats stage output")
    option("--out", dest="patches.out", metavar="DIR", help="output directory")
    option("--strategy", dest="patches.strategy", metavar="NAME", help="grid | uniform | ...")
    option(
        "--class-weighting",
        dest="patches.class_weighting",
        metavar="SCHEME",
        help="median_frequency | inverse_frequency | enet | none",
    )
    option("--centre-sampling", dest="patches.centre_sampling", metavar="RULE")
    option("--patch-size", dest="patches.patch_size", type=int, metavar="PX", help="patch side")
    option("--stride", dest="patches.stride", type=int, metavar="PX", help="grid step")
    option("--patches-per-image", dest="patches.patches_per_image", type=int, metavar="N")
    option("--seed", dest="patches.seed", type=int, metavar="N", help="random seed")
    option("--shard-size", dest="patches.shard_size", type=int, metavar="N")
    option("--workers", dest="patches.workers", type=int, metavar="N", help="processes")
    patches.set_defaults(run=_patches)


def _add_train(stages: Any) -> None:
    train = stages.add_parser("train", help="train one FCN variant (staged 32s -> 16s -> 8s)")
    option = train.add_argument
    option("--variant", required=True, metavar="NAME", help="fcn32s | fcn16s | fcn8s")
    option("--mode", dest="train.mode", metavar="MODE", help="full | patch")
    option("--class-weighting", dest="train.class_weighting", metavar="SCHEME")
    option("--loss-sampling", dest="train.loss_sampling", type=float, metavar="P")
    option("--upsample", dest="train.upsample", metavar="MODE", help="frozen | learned | interp")
    option("--width", dest="train.width", type=float, metavar="W", help="backbone width")
    option("--pretrained", dest="train.pretrained", metavar="FILE", help="torchvision VGG16")
    option("--device", dest="train.device", metavar="DEVICE", help="auto | cpu | cuda")
    option("--out", dest="train.out", metavar="DIR", help="models directory")
    option("--workers", dest="train.workers", type=int, metavar="N", help="DataLoader workers")
    train.set_defaults(run=_train)


def _add_evaluate(stages: Any) -> None:
    evaluate = stages.add_parser("evaluate", help="FCN metrics of one trained variant")
    option = evaluate.add_argument
    option("--variant", required=True, metavar="NAME", help="fcn32s | fcn16s | fcn8s")
    option("--split", dest="evaluate.split", metavar="SPLIT", help="train | val | test")
    option("--models", dest="evaluate.models", metavar="DIR", help="trained models directory")
    option("--metrics", dest="evaluate.metrics", metavar="DIR", help="metrics directory")
    option("--out", dest="evaluate.out", metavar="DIR", help="plots and overlays directory")
    option("--device", dest="evaluate.device", metavar="DEVICE", help="auto | cpu | cuda")
    evaluate.set_defaults(run=_evaluate)


def _add_study(stages: Any) -> None:
    study = stages.add_parser(
        "study", help="run a study's (setting, seed) DVC experiments and write its report"
    )
    study.add_argument("study_file", metavar="STUDY_FILE", help="studies/<name>.yaml")
    study.add_argument("--reports", default="reports", help="writes REPORTS/<study>/")
    study.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="experiments at a time, each in a clone of HEAD beside the project with "
        "cores/N torch threads (default 1: one after the other, in the workspace)",
    )
    study.set_defaults(run=_study)


def build_parser() -> argparse.ArgumentParser:
    """``fcn-pipeline [--params FILE] STAGE [options]``; each option overrides one key.

    Names (schemes, strategies) are checked by the params schema, not by argparse,
    so a bad one is reported like a bad params.yaml value.
    """
    parser = argparse.ArgumentParser(prog="fcn-pipeline", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--params", default="params.yaml", help="parameters file (default: %(default)s)"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=os.environ.get("FCN_DEBUG", "") not in ("", "0"),
        help="show tracebacks on failure (also FCN_DEBUG=1)",
    )
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for add in (
        _add_ingest, _add_stats, _add_patches, _add_train, _add_evaluate, _add_study,
        _add_predict, _add_export,
    ):  # fmt: skip
        add(stages)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Imported here, not at the top: the stages' spawned worker processes import
    # the console script's module (this one) and must not pay for pydantic.
    from fcn_pipeline.config import check_staged_variant, load_params
    from flows.server import prefect_api

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for torchrun's ranks
    overrides = {
        key: value for key, value in vars(args).items() if "." in key and value is not None
    }
    run: Callable[[argparse.Namespace, dict[str, Any]], Any] = args.run
    plain = getattr(args, "plain", False)  # predict, export: no params.yaml, no Prefect
    try:
        if plain:
            run(args, overrides)
            return 0
        load_params(args.params, overrides)  # fail fast, before Prefect starts
        if getattr(args, "variant", None) is not None:
            check_staged_variant(args.variant, name="--variant")
        if not args.debug:
            from flows.console import quiet_prefect_failures

            quiet_prefect_failures()
        # With no Prefect API configured, a temporary server that dies with this
        # process (Prefect's own would outlive a SIGKILL of the stage).
        with prefect_api():
            run(args, overrides)
    except KeyboardInterrupt:
        if plain:
            return _fail(args, "interrupted; the outputs written are complete", status=130)
        if args.stage == "study":
            return _fail(args, STUDY_INTERRUPTED, status=130)
        return _fail(args, "interrupted; the previous outputs are as they were", status=130)
    except PipelineError as error:
        return _fail(args, str(error))
    except Exception as error:  # not foreseen: still one line, the traceback on request
        first_line = (str(error).strip().splitlines() or [""])[0]
        hint = "" if args.debug else " (--debug or FCN_DEBUG=1 shows the traceback)"
        return _fail(args, f"{type(error).__name__}: {first_line}{hint}")
    return 0


def _fail(args: argparse.Namespace, message: str, status: int = 1) -> int:
    """Print the stage's ``error:`` line (after the traceback with ``--debug``)."""
    if args.debug:
        traceback.print_exc()
    print(f"fcn-pipeline {args.stage}: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
