"""The ``train@<variant>`` stages: one variant trained, every epoch logged with DVCLive.

With ``train.nproc_per_node`` or ``train.nnodes`` > 1, ``fcn-pipeline train`` starts
its ranks under torchrun (:func:`launch`), each running the same command again;
rank 0 is the stage (its DVCLive curves, its report to a Prefect parent run), the
other ranks only train (:func:`train_other_rank`)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fcn_pipeline.config import TrainParams
from fcn_pipeline.distributed import under_launcher, world_from_env
from fcn_pipeline.errors import PipelineError
from flows.stages import Report

# The params.yaml groups this stage reads; dvc.yaml declares the same.
PARAMS = ("train", "epochs")
# A directory of <variant>/checkpoint.pt to resume from where the stage's own checkpoint
# is missing or of another configuration: a study sets it for a run it was training in
# a lane when it was killed (`dvc exp run` checks out the committed checkpoint first).
RESUME_ENV = "FCN_RESUME_FROM"


def run(params: SimpleNamespace, variant: str | None, report: Report) -> dict[str, Any]:
    """Train ``variant`` for ``epochs.<variant>`` epochs at most (resuming from its
    checkpoint), every epoch logged to ``<train.live>/<variant>`` with DVCLive."""
    from dvclive import Live
    from fcn_pipeline.atomic import atomic_output_dir
    from fcn_pipeline.checkpoints import CHECKPOINT_FILE
    from fcn_pipeline.training import train_variant

    assert variant is not None
    settings, epochs = params.train, getattr(params.epochs, variant)
    kept = os.environ.get(RESUME_ENV)
    resume_from = Path(kept, variant, CHECKPOINT_FILE) if kept else None
    key = f"train-{variant}"
    report.progress(key, 0, epochs, f"{variant}: epochs of at most {epochs}")
    # dvcyaml=False: dvc.yaml declares the plots and metrics; save_dvc_exp=False: the
    # run is a `dvc repro`/`dvc exp run` stage, not an experiment of its own. The curves
    # are written aside and swapped in on success: a failed run keeps the previous ones.
    with (
        atomic_output_dir(f"{settings.live}/{variant}") as live_dir,
        Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None) as live,
    ):

        def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
            live.step = epoch
            for name, value in metrics.items():
                live.log_metric(name, value)
            live.next_step()
            report.progress(key, epoch, epochs, f"{variant}: val mean IU "
                            f"{metrics['val_mean_iu']:.4f} after epoch {epoch}")  # fmt: skip

        result = train_variant(settings, variant, epochs, on_epoch_end=on_epoch_end,
                               log=report.info, resume_from=resume_from)  # fmt: skip
        live.summary.update(result.summary)  # metrics.json: the last epoch's, and these
    summary = result.summary
    report.progress(key, epochs, epochs, f"{variant}: {result.epochs} epochs run")
    report.info(
        "%s: %d epochs (%d restored from the checkpoint), final val mean IU %s, best %s at "
        "epoch %d%s; wrote %s", variant, result.epochs, result.resumed_from,
        f"{result.history[-1]['val_mean_iu']:.4f}" if result.history else "n/a",
        f"{summary['best_val_mean_iu']:.4f}" if result.history else "n/a", result.best_epoch,
        " (stopped on a plateau)" if result.stopped_on_plateau else "", result.model_path,
    )  # fmt: skip
    report.table(
        f"{key}-curve",
        [{"epoch": n, **{k: round(v, 4) for k, v in m.items()}}
         for n, m in enumerate(result.history, start=1)],
        f"{variant}: per-epoch training loss and validation scores",
    )  # fmt: skip
    report.link(f"{key}-model", result.model_path, f"{variant}: best validation epoch's weights")
    final = result.history[-1] if result.history else {}
    return {"model": str(result.model_path), "epochs": result.epochs, "final": final, **summary}


def launch(params: SimpleNamespace, variant: str, argv: list[str]) -> dict[str, Any] | None:
    """What this process does instead of the stage, if anything: start the ranks under
    torchrun (more than one asked for, none started yet), or train as a rank other than
    0. None: this process is the stage (one process, or rank 0)."""
    if needs_launcher(params.train):
        return launch_ranks(params.train, argv)
    if other_rank():
        return train_other_rank(params, variant)
    return None


def needs_launcher(train: TrainParams) -> bool:
    """More than one rank asked for, and this process is not one of them yet."""
    return (train.nproc_per_node > 1 or train.nnodes > 1) and not under_launcher()


def other_rank() -> bool:
    """A rank under torchrun other than rank 0."""
    return under_launcher() and not world_from_env().main


def train_other_rank(params: SimpleNamespace, variant: str) -> dict[str, Any]:
    """What a rank other than 0 does: the same training, no curves, no report."""
    from fcn_pipeline.training import train_variant

    result = train_variant(params.train, variant, getattr(params.epochs, variant))
    return {"model": str(result.model_path), "epochs": result.epochs}


def torchrun_command(train: TrainParams, argv: list[str]) -> list[str]:
    """The ``torch.distributed.run`` line that starts ``train.nproc_per_node`` ranks of
    ``fcn-pipeline <argv>`` on this machine: standalone on one node, else a c10d
    rendezvous at ``train.rdzv_endpoint`` (every node runs the same command). No
    restarts: a rank that fails ends the run, and a node that never joins fails it
    after ``train.dist_timeout_s``."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={train.nproc_per_node}",
        "--max_restarts=0",
    ]
    if train.nnodes == 1:
        command.append("--standalone")  # a free local port: runs never collide
    else:
        command += [
            f"--nnodes={train.nnodes}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={train.rdzv_endpoint}",
            f"--rdzv_id={train.rdzv_id}",
            f"--rdzv_conf=join_timeout={math.ceil(train.dist_timeout_s)}",
        ]
    return [*command, "-m", "flows.cli", *argv]


def launch_ranks(train: TrainParams, argv: list[str]) -> dict[str, Any]:
    """Run the stage under torchrun and wait; raise :class:`PipelineError` when a rank
    fails (its own ``error:`` line, or torchrun's report of a dead one, is above)."""
    processes = train.nproc_per_node * train.nnodes
    status = subprocess.run(torchrun_command(train, argv), check=False).returncode
    if status != 0:
        raise PipelineError(
            f"distributed training failed: torchrun exited with status {status} "
            f"({train.nproc_per_node} processes here, {processes} in all); the failing "
            "rank's error, or torchrun's report of the rank that died, is above"
        )
    return {"world_size": processes}
