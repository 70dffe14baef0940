"""A stage as a Prefect flow run, a child of the pipeline or study run that started DVC.

The pipeline flow (:mod:`flows.pipeline`) and the study flow (:mod:`flows.study`) run
DVC with their flow run's id in ``FCN_PREFECT_PARENT`` (:func:`parent_env`). A stage
command that finds it (and so a Prefect API) runs its plain function
(:mod:`flows.stages`) as a flow run of its own, linked to that parent the way
Prefect links a subflow: a placeholder task run in the parent flow run (named like
the stage, ``train@fcn8s``) whose ``id`` is the child's ``parent_task_run_id``. The
server keeps the placeholder's state equal to the child's, so the pipeline run's page
lists the stages as its subflow runs, a failed stage shows failed there, and the
stage's logs and artifacts belong to its own run.

Artifacts (keys are per stage, so each is versioned across runs on the server):
training progress (``train-<variant>``, updated every epoch), the epoch table
(``train-<variant>-curve``), the paper's scores and per-class IU of each evaluated
variant (``<variant>-metrics``, ``<variant>-per-class-iu``), links to the files the
stages wrote, class weights and ingested split sizes.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prefect import Flow, Task, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.flow_engine import run_flow
from prefect.states import Pending

from flows.stages import PARENT_ENV, Report, error_message, label, run_stage


def parent_env() -> dict[str, str]:
    """``{FCN_PREFECT_PARENT: <this flow run's id>}`` inside a flow run, else ``{}``: the
    environment that makes the stages DVC starts report to this run as its children."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return {}
    return {PARENT_ENV: str(context.flow_run.id)}


class RunReport(Report):
    """Logs to the stage's flow run and publishes what the stage reports as artifacts."""

    def __init__(self, name: str) -> None:
        self.logger = get_run_logger()  # type: ignore[assignment]
        self._progress: dict[str, Any] = {}

    def progress(self, key: str, done: int, total: int, description: str) -> None:
        percent = 100.0 * done / max(total, 1)
        if key not in self._progress:
            self._progress[key] = create_progress_artifact(
                progress=percent, key=key, description=description
            )
        else:
            update_progress_artifact(self._progress[key], progress=percent, description=description)

    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None:
        create_table_artifact(table=rows, key=key, description=description)

    def link(self, key: str, path: str | Path, description: str) -> None:
        target = Path(path).resolve()
        create_link_artifact(
            link=target.as_uri(), link_text=str(path), key=key, description=description
        )


def run_as_flow(
    stage: str, variant: str | None, params: SimpleNamespace, parent: str | None,
    shown: dict[str, Any], return_state: bool = False,
) -> Any:  # fmt: skip
    """Run the stage with ``params`` as a flow run named like the stage (``train@fcn8s``):
    a child of flow run ``parent`` when given (a placeholder task run in the parent
    links them), else a top-level run (the data stages on Dask, run on their own).
    ``shown``: how the params were given (file, overrides), the run's parameters in the
    UI. Returns the stage's result (its final state with ``return_state``); raises the
    stage's error after its run failed."""
    name = label(stage, variant)

    def body(
        stage: str, variant: str | None, params_file: str, overrides: dict[str, Any]
    ) -> dict[str, Any]:
        try:
            return run_stage(stage, variant, params, RunReport(name))
        except Exception as error:  # the run's log gets the line the terminal gets
            get_run_logger().error("fcn-pipeline %s: error: %s", stage, error_message(error))
            raise

    flow = Flow(body, name=stage, flow_run_name=name, log_prints=True, validate_parameters=False)
    parameters = {"stage": stage, "variant": variant, **shown}
    if parent is None:
        return flow(**parameters, return_state=return_state)
    with get_client(sync_client=True) as client:
        placeholder = Task(name=name, fn=body)
        task_run = client.create_task_run(
            task=placeholder,
            flow_run_id=uuid.UUID(parent),
            dynamic_key=f"{name}-{uuid.uuid4().hex[:8]}",
            name=name,
            state=Pending(),
        )
        flow_run = client.create_flow_run(
            flow=flow,
            name=name,
            parameters=flow.serialize_parameters(parameters),
            parent_task_run_id=task_run.id,
            state=Pending(),
        )
    return run_flow(
        flow, flow_run=flow_run, parameters=parameters,
        return_type="state" if return_state else "result",
    )  # fmt: skip
