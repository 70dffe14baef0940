"""`prefect deployment run` end to end: a real server and worker on loopback
(scripts/prefect-server.sh), the deployments of prefect.yaml, and DVC recording
what each run did, in a temporary copy of the project.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from flows.dvc_driver import _stage_error_lines, dvc_command
from flows.summary import metrics_markdown
from tests.conftest import copy_project, free_port

# A tiny run (as in test_pipeline_dvc.py). Only keys params.yaml has are set:
# whoever adds a slow stage adds its small knobs here.
TINY = {
    "data.synthetic.splits": {"train": 4, "val": 2, "test": 2},
    "data.synthetic.height": 48,
    "data.synthetic.width": 64,
    "data.workers": 1,
    "stats.workers": 1,
    "patches.workers": 1,
    "patches.patches_per_image": 2,
    "train.width": 0.03125,
    "epochs": {"fcn32s": 1, "fcn16s": 1, "fcn8s": 1},
    "train.batch_size": 2,
    "train.workers": 0,
    "train.device": "cpu",
    "evaluate.workers": 0,
    "evaluate.overlays": 2,
    "evaluate.device": "cpu",
}
METRIC_KEYS = ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")


# What the flow builds from its parameters, and what it reports (no server needed).


def test_reproduce_runs_dvc_repro_and_experiments_run_dvc_exp_run():
    assert dvc_command([], [], experiment=False, experiment_name=None) == ["repro"]
    assert dvc_command(["stats"], [], experiment=False, experiment_name=None) == ["repro", "stats"]
    experiment = dvc_command(
        ["ingest"],
        ["data.synthetic.seed=3", "train.lr=0.01"],
        experiment=True,
        experiment_name="s3",
    )
    assert (
        " ".join(experiment) == "exp run -S data.synthetic.seed=3 -S train.lr=0.01 --name s3 ingest"
    )


def test_overrides_need_an_experiment_and_the_key_value_form():
    with pytest.raises(ValueError, match="fcn-pipeline/experiment"):
        dvc_command([], ["data.synthetic.seed=3"], experiment=False, experiment_name=None)
    from fcn_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="key=value"):
        dvc_command([], ["data.synthetic.seed"], experiment=True, experiment_name=None)


def test_a_failed_stage_is_reported_by_its_own_error_lines():
    section = [
        "> fcn-pipeline ingest",
        "12:00:00.000 | INFO    | Flow run 'x' - Beginning flow run 'x' for flow 'ingest'",
        "fcn-pipeline ingest: error: /src: dataset is invalid: 1 problem(s)",
        "  /src/images/img2.png: image does not decode (image file is truncated)",
        "ERROR: failed to reproduce 'ingest': failed to run: fcn-pipeline ingest, exited with 1",
    ]
    assert _stage_error_lines(section) == section[2:4]


def test_metrics_artifact_lists_each_variant_or_says_there_are_none():
    revision = {"commit": "0123abc", "experiment": "seed-3", "experiment_sha": "9876fed"}
    run = {"command": ["dvc", "exp", "run"], "ran": ["evaluate@fcn8s"], "skipped": ["ingest"]}
    scores = {"pixel_acc": 0.9, "mean_acc": 0.7, "mean_iu": 0.55, "fw_iu": 0.85}
    markdown = metrics_markdown({"metrics/fcn8s.json": scores}, revision, run)
    assert "| fcn8s | 0.9000 | 0.7000 | 0.5500 | 0.8500 |" in markdown
    assert "0123abc" in markdown and "seed-3" in markdown and "9876fed" in markdown
    assert "No metrics yet" in metrics_markdown({}, revision, run)


# The deployments, end to end.


def set_existing(params: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Set each dotted key of ``values`` in ``params`` if that key exists there."""
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = params
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = value
    return params


@dataclass
class DeploymentRun:
    returncode: int
    flow_run_id: str
    output: str
    seconds: float


@dataclass
class Stack:
    """A project copy with its own Prefect server, worker and deployments."""

    project: Path
    env: dict[str, str]
    api_url: str

    def sh(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            argv, cwd=self.project, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def dvc(self, *args: str) -> subprocess.CompletedProcess:
        return self.sh("dvc", *args)

    def deployment_run(self, name: str, **params: Any) -> DeploymentRun:
        argv = ["prefect", "deployment", "run", name, "--watch"]
        for key, value in params.items():
            argv += ["--param", f"{key}={json.dumps(value)}"]
        start = time.monotonic()
        run = self.sh(*argv, timeout=900)
        output = run.stdout + run.stderr
        found = re.search(r"UUID: ([0-9a-f-]{36})", output)
        assert found, output
        return DeploymentRun(run.returncode, found.group(1), output, time.monotonic() - start)

    def client(self):
        """A sync Prefect client of this server (the context manager of ``get_client``)."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.api_url}):
            return get_client(sync_client=True)

    def logs(self, flow_run_id: str) -> list[Any]:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        only_this_run = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        logs: list[Any] = []
        with self.client() as client:
            while page := client.read_logs(log_filter=only_this_run, offset=len(logs), limit=200):
                logs += page
        return logs

    def flow_run(self, flow_run_id: str) -> Any:
        with self.client() as client:
            return client.read_flow_run(flow_run_id)

    def stage_names(self) -> list[str]:
        listing = self.dvc("stage", "list", "--name-only")
        assert listing.returncode == 0, listing.stderr
        return listing.stdout.split()

    def outputs_snapshot(self) -> dict[str, bytes]:
        """Bytes of ``dvc.lock`` and of every file of every output it records."""
        lock = self.project / "dvc.lock"
        snapshot = {"dvc.lock": lock.read_bytes()}
        for stage in yaml.safe_load(lock.read_text())["stages"].values():
            for out in stage.get("outs", []):
                path = self.project / out["path"]
                files = sorted(path.rglob("*")) if path.is_dir() else [path]
                for file in files:
                    if file.is_file():
                        snapshot[str(file.relative_to(self.project))] = file.read_bytes()
        return snapshot


def stack_env(prefect_home: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_UI_ENABLED="true",  # test_the_ui_... opens it in a browser
        PREFECT_WORKER_QUERY_SECONDS="2",  # pick runs up quickly
    )
    return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Server, worker and deployments started by scripts/prefect-server.sh; always stopped."""
    root = tmp_path_factory.mktemp("deployment")
    project = copy_project(root / "project")
    params_file = project / "params.yaml"
    params = set_existing(yaml.safe_load(params_file.read_text()), TINY)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "commit", "-qam", "tiny params"], cwd=project, check=True)

    port = free_port()
    stack = Stack(project, stack_env(root / "prefect-home", port), f"http://127.0.0.1:{port}/api")
    try:
        start = stack.sh("bash", "scripts/prefect-server.sh", "start", timeout=300)
        logs = "".join(
            f"\n--- {log.name}\n{log.read_text()[-3000:]}"
            for log in sorted((project / ".prefect-local").glob("*.log"))
        )
        assert start.returncode == 0, start.stdout + start.stderr + logs
        yield stack
    finally:  # also when start or a test failed: nothing may outlive the module
        stop = stack.sh("bash", "scripts/prefect-server.sh", "stop", timeout=120)
        print(stop.stdout + stop.stderr)


@pytest.fixture(scope="module")
def first_run(stack: Stack) -> DeploymentRun:
    """`fcn-pipeline/reproduce` on the fresh copy: every stage runs."""
    run = stack.deployment_run("fcn-pipeline/reproduce")
    assert run.returncode == 0, run.output
    return run


@pytest.mark.slow
def test_script_reports_server_worker_and_deployments(stack):
    status = stack.sh("bash", "scripts/prefect-server.sh", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "running (pid" in status.stdout and stack.api_url in status.stdout
    assert "fcn-pipeline/reproduce" in status.stdout
    assert "fcn-pipeline/experiment" in status.stdout


@pytest.mark.slow
def test_deployment_run_is_versioned_by_dvc(stack, first_run):
    stages = stack.stage_names()
    assert "ingest" in stages

    # dvc.lock describes every stage's outputs and DVC finds nothing stale.
    lock = yaml.safe_load((stack.project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(stages)
    status = stack.dvc("status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout

    # The cached outputs are in the DVC cache, file by file.
    from dvc.repo import Repo

    cache = stack.project / ".dvc" / "cache" / "files" / "md5"
    with Repo(str(stack.project)) as repo:
        cached = [out for out in repo.index.outs if out.use_cache]
        assert cached
        for out in cached:
            md5 = out.hash_info.value
            assert md5 and (cache / md5[:2] / md5[2:]).is_file(), out
            if md5.endswith(".dir"):
                for entry in json.loads((cache / md5[:2] / md5[2:]).read_text()):
                    assert (cache / entry["md5"][:2] / entry["md5"][2:]).is_file(), entry

    # `dvc metrics show` works; every metrics file dvc.yaml declares was written,
    # and the evaluation's (metrics/<variant>.json) hold the paper's four scores.
    shown = stack.dvc("metrics", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    declared = next(iter(json.loads(shown.stdout).values()), {}).get("data", {})
    params = yaml.safe_load((stack.project / "params.yaml").read_text())
    scores_dir = params.get("evaluate", {}).get("metrics", "metrics")
    scores = {}
    for path, entry in declared.items():
        assert "error" not in entry and (stack.project / path).is_file(), (path, entry)
        if Path(path).parent.as_posix() == scores_dir:
            scores[Path(path).stem] = entry["data"]
    for variant, values in scores.items():
        for key in METRIC_KEYS:
            assert 0.0 <= values[key] <= 1.0, (variant, key, values)

    # The run published the pipeline-summary artifact with the revision it belongs to.
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with stack.client() as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pipeline-summary"])),
            sort=ArtifactSort.CREATED_DESC,
        )
    mine = [a for a in artifacts if str(a.flow_run_id) == first_run.flow_run_id]
    assert len(mine) == 1, artifacts
    head = stack.sh("git", "rev-parse", "HEAD").stdout.strip()
    assert head in mine[0].data
    for variant, values in scores.items():
        assert f"| {variant} | {values['pixel_acc']:.4f} |" in mine[0].data
    if not declared:
        assert "No metrics yet" in mine[0].data

    assert "Against the committed reference (`dvc metrics diff`" in mine[0].data

    # Each stage DVC ran is a subflow run of the pipeline run, named as in dvc.yaml,
    # completed, with its artifacts (the evaluated variants' scores among them).
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with stack.client() as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[first_run.flow_run_id])
            )
        )
        kinds = {artifact.key: artifact.type for artifact in client.read_artifacts()}
    assert sorted(run.name for run in children) == sorted(stages)
    assert all(run.state.is_completed() for run in children)
    assert kinds["pipeline-summary"] == "markdown"
    for variant in scores:
        assert kinds[f"{variant}-metrics"] == kinds[f"{variant}-per-class-iu"] == "table"
        assert kinds[f"train-{variant}"] == "progress"


@pytest.mark.slow
def test_second_run_with_nothing_changed_reruns_nothing(stack, first_run):
    before = stack.outputs_snapshot()
    run = stack.deployment_run("fcn-pipeline/reproduce")
    assert run.returncode == 0, run.output
    assert run.seconds < 60, f"no-op run took {run.seconds:.0f} s"

    messages = "\n".join(log.message for log in stack.logs(run.flow_run_id))
    for stage in stack.stage_names():
        assert f"Stage '{stage}' didn't change, skipping" in messages, messages
    assert "Running stage" not in messages, messages
    assert stack.outputs_snapshot() == before


@pytest.mark.slow
def test_failing_stage_fails_the_run_and_keeps_last_good_outputs(stack, first_run, tmp_path):
    # A folder dataset with one truncated image: the ingest stage rejects it.
    source = tmp_path / "bad-source"
    for sub in ("images", "masks", "splits"):
        (source / sub).mkdir(parents=True)
    (source / "classes.txt").write_text("background\nthing\n")
    for index, split in enumerate(["train", "train", "val", "test"]):
        Image.new("RGB", (32, 32), (40 * index, 0, 0)).save(source / "images" / f"img{index}.png")
        Image.new("L", (32, 32), index % 2).save(source / "masks" / f"img{index}.png")
        with (source / "splits" / f"{split}.txt").open("a") as listing:
            listing.write(f"img{index}\n")
    bad = source / "images" / "img2.png"
    bad.write_bytes(bad.read_bytes()[:60])

    params_file = stack.project / "params.yaml"
    good_params = params_file.read_bytes()
    params = yaml.safe_load(good_params)
    params["data"].update(format="folder", root=str(source))
    before = stack.outputs_snapshot()
    try:
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        run = stack.deployment_run("fcn-pipeline/reproduce")
        after = stack.outputs_snapshot()
    finally:
        params_file.write_bytes(good_params)

    assert run.returncode != 0, run.output
    assert stack.flow_run(run.flow_run_id).state.is_failed()
    errors = [log.message for log in stack.logs(run.flow_run_id) if log.level >= 40]
    assert any("'ingest'" in m and "img2.png" in m for m in errors), errors
    # Exactly the failing stage's child run failed, its log with the stage's one line.
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with stack.client() as client:
        [child] = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.flow_run_id])
            )
        )
    assert child.name == "ingest" and child.state.is_failed()
    lines = [log.message for log in stack.logs(str(child.id)) if log.level >= 40]
    stage_line = [m for m in lines if m.startswith("fcn-pipeline ingest: error: ")]
    assert len(stage_line) == 1 and "img2.png" in stage_line[0], lines
    assert any(stage_line[0] in m for m in errors)  # the same line in the pipeline's log
    assert after == before  # the last good outputs and dvc.lock, byte for byte
    assert stack.dvc("status").stdout.strip() == "Data and pipelines are up to date."


@pytest.mark.slow
def test_experiment_deployment_records_a_dvc_experiment(stack, first_run):
    params_file, lock_file = stack.project / "params.yaml", stack.project / "dvc.lock"
    params_before, lock_before = params_file.read_bytes(), lock_file.read_bytes()
    try:
        run = stack.deployment_run(
            "fcn-pipeline/experiment",
            overrides=["data.synthetic.seed=7"],
            experiment_name="seed-7",
            targets=["ingest"],
        )
        assert run.returncode == 0, run.output
        shown = stack.dvc("exp", "show", "--json")
        assert shown.returncode == 0, shown.stderr
        assert '"seed-7"' in shown.stdout
        assert yaml.safe_load(params_file.read_text())["data"]["synthetic"]["seed"] == 7
        messages = "\n".join(log.message for log in stack.logs(run.flow_run_id))
        assert "dvc exp run -S data.synthetic.seed=7 --name seed-7 ingest" in messages
    finally:  # back to the baseline for the other tests
        params_file.write_bytes(params_before)
        lock_file.write_bytes(lock_before)
        stack.dvc("checkout", "--force")


# --- the UI, in a real browser --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.browser
def test_the_ui_shows_the_stages_inside_the_pipeline_run(stack, first_run, tmp_path):
    """The Prefect UI's page of a `fcn-pipeline/reproduce` run, in headless Chromium,
    lists the nine stages as its subflow runs and shows the metrics artifact; a
    screenshot is saved (to ``FCN_UI_SCREENSHOT`` when set: how
    docs/prefect-pipeline-run.png was made)."""
    from tests.browser import browser_page, chromium

    executable = chromium()
    if executable is None:
        pytest.skip("no Chromium: `apt-get install chromium` (Debian); .ci/run installs it")
    stages = stack.stage_names()
    page_url = f"{stack.api_url.removesuffix('/api')}/runs/flow-run/{first_run.flow_run_id}"
    shot = Path(os.environ.get("FCN_UI_SCREENSHOT") or tmp_path / "pipeline-run.png")
    with browser_page(executable, height=1500) as page:
        page.goto(page_url)
        page.wait_for(lambda text: "Subflow Runs" in text, what="the run's tabs")
        page.click("#subflow-runs")  # a tab, as a user clicks it
        listed = page.wait_for(
            lambda text: f"{len(stages)} Flow runs" in text and all(s in text for s in stages),
            what=f"the {len(stages)} stages as subflow runs",
        )
        assert listed.count("Completed") >= len(stages) + 1  # the stages and the run
        page.screenshot(shot)
        page.click("#artifacts")
        page.wait_for(lambda text: "pipeline-summary" in text, what="the pipeline-summary artifact")
    assert shot.read_bytes()[:4] == b"\x89PNG"
