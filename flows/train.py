"""The ``train_<variant>`` stages as a Prefect flow, logging every epoch with DVCLive;
with ``train.nproc_per_node`` or ``train.nnodes`` > 1, launched under torchrun."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

from prefect import flow, get_run_logger, task

from fcn_pipeline.atomic import atomic_output_dir
from fcn_pipeline.config import TrainParams
from fcn_pipeline.distributed import under_launcher, world_from_env
from fcn_pipeline.errors import PipelineError
from flows.common import TASK_DEFAULTS, stage_params

# The params.yaml groups this stage reads; dvc.yaml declares the same.
PARAMS = ("train", "epochs")


@task(name="train-fcn", **TASK_DEFAULTS)
def train_fcn(params: TrainParams, variant: str, epochs: int) -> dict[str, Any]:
    """Train ``variant`` for ``epochs`` epochs (resuming from its checkpoint); log epochs
    to ``<live>/<variant>``."""
    from dvclive import Live
    from fcn_pipeline.training import train_variant

    logger = get_run_logger()
    # dvcyaml=False: dvc.yaml declares the plots and metrics; save_dvc_exp=False: the
    # run is a `dvc repro`/`dvc exp run` stage, not an experiment of its own. The curves
    # are written aside and swapped in on success: a failed run keeps the previous ones.
    with (
        atomic_output_dir(f"{params.live}/{variant}") as live_dir,
        Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None) as live,
    ):

        def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
            live.step = epoch
            for name, value in metrics.items():
                live.log_metric(name, value)
            live.next_step()

        result = train_variant(params, variant, epochs, on_epoch_end=on_epoch_end, log=logger.info)
        live.summary.update(result.summary)  # metrics.json: the last epoch's, and these
    final = result.history[-1] if result.history else {}
    summary = result.summary
    logger.info(
        "%s: %d epochs (%d restored from the checkpoint), final val mean IU %s, best %s at "
        "epoch %d%s; wrote %s",
        result.variant,
        result.epochs,
        result.resumed_from,
        f"{final['val_mean_iu']:.4f}" if final else "n/a",
        f"{summary['best_val_mean_iu']:.4f}" if final else "n/a",
        result.best_epoch,
        " (stopped on a plateau)" if result.stopped_on_plateau else "",
        result.model_path,
    )
    return {"model": str(result.model_path), "epochs": result.epochs, "final": final, **summary}


@flow(name="train", log_prints=True)
def train_flow(
    variant: str, params_file: str = "params.yaml", overrides: dict[str, Any] | None = None
) -> dict:
    """Run the ``train@<variant>`` stage with ``params_file`` (``train:`` and
    ``epochs.<variant>``) and overrides."""
    params = stage_params(params_file, overrides, PARAMS)
    return train_fcn(params.train, variant, getattr(params.epochs, variant))


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


def train_stage(
    variant: str, params_file: str, overrides: dict[str, Any] | None, argv: list[str]
) -> Any:
    """The ``fcn-pipeline train`` command (``argv``: its arguments).

    One process: the Prefect flow. ``train.nproc_per_node`` or ``train.nnodes`` > 1
    and no launcher yet: start the ranks under torchrun, each running this again.
    Under a launcher, rank 0 runs the Prefect flow (the one Prefect client, the
    DVCLive logs, the files) and the other ranks run the same training without
    Prefect, so a run never starts one Prefect server per rank."""
    params = stage_params(params_file, overrides, PARAMS)
    train = params.train
    if not under_launcher():
        if train.nproc_per_node > 1 or train.nnodes > 1:
            return launch_ranks(train, argv)
        return train_flow(variant=variant, params_file=params_file, overrides=overrides)
    if world_from_env().main:
        return train_flow(variant=variant, params_file=params_file, overrides=overrides)
    from fcn_pipeline.training import train_variant

    result = train_variant(train, variant, getattr(params.epochs, variant))
    return {"model": str(result.model_path), "epochs": result.epochs}
