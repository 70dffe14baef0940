"""``fcn-pipeline``: one subcommand per stage (what dvc.yaml runs), plus ``pipeline``,
``study``, ``predict`` and ``export``.

A stage is a plain program (:mod:`flows.stages`): it needs no Prefect server. Under
the pipeline or study flow (the deployments, or ``fcn-pipeline pipeline``/``study``
with ``PREFECT_API_URL`` set) DVC passes the flow run's id down and the stage runs as
its child flow run (:mod:`flows.stage_runs`). Options default to ``params.yaml``; any
option given on the command line overrides the matching key for this run only.
Parameters are validated before anything runs, so a bad key fails in well under a
second.

A failure, whatever its cause, ends in one line on stderr,
``fcn-pipeline <stage>: error: <what, which file or key>``, and exit status 1
(130 when interrupted). The traceback goes to the terminal only with ``--debug`` or
``FCN_DEBUG=1`` (and to the Prefect run's log when there is one).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import uuid
from collections.abc import Callable
from typing import Any

from fcn_pipeline.errors import ConfigError, PipelineError

# The subcommands that are dvc.yaml stages (flows/<stage>.py).
STAGE_COMMANDS = ("ingest", "stats", "patches", "train", "evaluate")


def _stage(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    """A stage: a plain program, or a child flow run of the pipeline or study flow run
    that started DVC (its id in ``FCN_PREFECT_PARENT``)."""
    from flows.stages import PARENT_ENV, needs_flow_run, run_stage, stage_module, stage_params

    variant = getattr(args, "variant", None)
    module = stage_module(args.stage)
    params = stage_params(args.params, overrides, module.PARAMS)
    launch = getattr(module, "launch", None)  # train: torchrun's ranks
    if launch is not None and (launched := launch(params, variant, args.argv)) is not None:
        return launched
    parent = os.environ.get(PARENT_ENV) or None
    if parent is None and not needs_flow_run(params):
        return run_stage(args.stage, variant, params)
    if parent is not None:
        try:
            uuid.UUID(parent)
        except ValueError:
            raise ConfigError(f"{PARENT_ENV}={parent!r}: not a Prefect flow run id") from None
    if not args.debug:
        from flows.console import quiet_prefect_failures

        quiet_prefect_failures()
    from flows.stage_runs import run_as_flow

    shown = {"params_file": args.params, "overrides": overrides}
    return run_as_flow(args.stage, variant, params, parent, shown)


def _prefect_api() -> str | None:
    """The Prefect API this process would report to, if one is configured."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    from prefect.settings import PREFECT_API_URL  # a profile may set it

    return PREFECT_API_URL.value() or None


def _study(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    """A study: a plain program, or a Prefect flow run (with the experiments' stages as
    its children) when a Prefect API is configured."""
    from fcn_pipeline.study import load_study

    study = load_study(args.study_file, args.params)  # bad input: refused up front
    from flows.study_driver import check_params_left_over

    check_params_left_over(os.getcwd(), study, args.params)
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: run at least one experiment at a time")
    if args.jobs > 1:  # lanes are clones of HEAD: refuse uncommitted changes up front
        from flows.study_driver import check_committed

        check_committed(os.getcwd())
    if _prefect_api() is None:
        from flows.stages import Report
        from flows.study import run_study

        log = Report("study").logger
        return run_study(args.study_file, args.params, args.reports, args.jobs, log)
    if not args.debug:
        from flows.console import quiet_prefect_failures

        quiet_prefect_failures()
    from flows.pipeline import study_flow

    return study_flow(
        study_file=args.study_file, params_file=args.params, reports=args.reports, jobs=args.jobs
    )


def _pipeline(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    """The pipeline flow (``dvc repro`` or ``dvc exp run``) as a run on the Prefect API
    configured, the stages as its children: what the deployments run."""
    from fcn_pipeline.config import load_params, parse_overrides

    if _prefect_api() is None:
        raise ConfigError(
            "pipeline: no Prefect API configured (PREFECT_API_URL): run `dvc repro` for a "
            "plain run, or `bash scripts/prefect-server.sh start && source "
            ".prefect-local/env` first"
        )
    load_params(args.params, parse_overrides(args.set))  # every key known, every value fits
    if args.set and args.exp is None:
        raise ConfigError("pipeline: -S KEY=VALUE needs --exp (an experiment)")
    if not args.debug:
        from flows.console import quiet_prefect_failures

        quiet_prefect_failures()
    from flows.pipeline import pipeline_flow

    return pipeline_flow(
        targets=args.targets, overrides=args.set, experiment=args.exp is not None,
        experiment_name=args.exp or None,
    )  # fmt: skip


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
        **({} if args.context is None else {"context": args.context}),
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
    option("--context", type=int, metavar="PX",
           help="pixels each window also sees around itself (default: the net's reach, "
           "so tiles give the whole image's masks; 0: the window alone)")  # fmt: skip
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
    _add_set(ingest)
    ingest.set_defaults(run=_stage)


def _add_stats(stages: Any) -> None:
    stats = stages.add_parser("stats", help="per-class pixel statistics and class weights")
    option = stats.add_argument
    option("--data", dest="data.out", metavar="INGESTED_DIR", help="ingested dataset")
    option("--out", dest="stats.out", metavar="DIR", help="output directory")
    option("--workers", dest="stats.workers", type=int, metavar="N", help="processes (0 = all)")
    _add_set(stats)
    stats.set_defaults(run=_stage)


def _add_patches(stages: Any) -> None:
    patches = stages.add_parser("patches", help="cut training patches from the train split")
    option = patches.add_argument
    option("--data", dest="data.out", metavar="INGESTED_DIR", help="ingested dataset")
    option("--stats", dest="stats.out", metavar="STATS_DIR", help="stats stage output")
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
    _add_set(patches)
    patches.set_defaults(run=_stage)


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
    _add_set(train)
    train.set_defaults(run=_stage)


def _add_evaluate(stages: Any) -> None:
    evaluate = stages.add_parser("evaluate", help="FCN metrics of one trained variant")
    option = evaluate.add_argument
    option("--variant", required=True, metavar="NAME", help="fcn32s | fcn16s | fcn8s")
    option("--split", dest="evaluate.split", metavar="SPLIT", help="train | val | test")
    option("--models", dest="train.out", metavar="DIR", help="trained models directory")
    option("--metrics", dest="evaluate.metrics", metavar="DIR", help="metrics directory")
    option("--out", dest="evaluate.out", metavar="DIR", help="plots and overlays directory")
    option("--device", dest="evaluate.device", metavar="DEVICE", help="auto | cpu | cuda")
    _add_set(evaluate)
    evaluate.set_defaults(run=_stage)


def _add_set(stage: Any) -> None:
    stage.add_argument(
        "-S", "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override any params.yaml key for this run, as dvc exp run -S (repeatable)",
    )  # fmt: skip


def collect_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """A stage's overrides: its flags (each names one key), then its ``-S KEY=VALUE``."""
    from fcn_pipeline.config import parse_overrides

    flags = vars(args).items()
    overrides = {key: value for key, value in flags if "." in key and value is not None}
    if args.stage in STAGE_COMMANDS:
        overrides.update(parse_overrides(args.set))
    return overrides


def _add_pipeline(stages: Any) -> None:
    pipeline = stages.add_parser(
        "pipeline", help="dvc repro (or dvc exp run) as a Prefect run, the stages inside it"
    )
    option = pipeline.add_argument
    option("targets", nargs="*", metavar="TARGET", help="stages to reproduce (default: all)")
    option("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
           help="override a parameter (with --exp), as dvc exp run -S")  # fmt: skip
    option("--exp", nargs="?", const="", metavar="NAME",
           help="run a DVC experiment (named NAME, else run-<date>-<time>)")  # fmt: skip
    pipeline.set_defaults(run=_pipeline)


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
        _add_ingest, _add_stats, _add_patches, _add_train, _add_evaluate, _add_pipeline,
        _add_study, _add_predict, _add_export,
    ):  # fmt: skip
        add(stages)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Imported here, not at the top: the stages' spawned worker processes import
    # the console script's module (this one) and must not pay for pydantic.
    from fcn_pipeline.config import check_staged_variant

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for torchrun's ranks
    run: Callable[[argparse.Namespace, dict[str, Any]], Any] = args.run
    plain = getattr(args, "plain", False)  # predict, export: no params.yaml
    try:
        overrides = collect_overrides(args)
        if getattr(args, "variant", None) is not None:
            check_staged_variant(args.variant, name="--variant")
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
        from flows.stages import error_message

        hint = "" if args.debug else " (--debug or FCN_DEBUG=1 shows the traceback)"
        return _fail(args, error_message(error) + hint)
    return 0


def _fail(args: argparse.Namespace, message: str, status: int = 1) -> int:
    """Print the stage's ``error:`` line (after the traceback with ``--debug``)."""
    if args.debug:
        traceback.print_exc()
    print(f"fcn-pipeline {args.stage}: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
