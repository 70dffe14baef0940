"""The ``train_<variant>`` stages as a Prefect flow, logging every epoch with DVCLive."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from fcn_pipeline.atomic import atomic_output_dir
from fcn_pipeline.config import TrainParams
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
    final = result.history[-1] if result.history else {}
    logger.info(
        "%s: %d epochs (%d restored from the checkpoint), final val mean IU %s; wrote %s",
        result.variant,
        result.epochs,
        result.resumed_from,
        f"{final['val_mean_iu']:.4f}" if final else "n/a",
        result.model_path,
    )
    return {"model": str(result.model_path), "epochs": result.epochs, "final": final}


@flow(name="train", log_prints=True)
def train_flow(
    variant: str, params_file: str = "params.yaml", overrides: dict[str, Any] | None = None
) -> dict:
    """Run the ``train@<variant>`` stage with ``params_file`` (``train:`` and
    ``epochs.<variant>``) and overrides."""
    params = stage_params(params_file, overrides, PARAMS)
    return train_fcn(params.train, variant, getattr(params.epochs, variant))
