"""Shared fixtures: the real CamVid copy, a shared Prefect API, project copies."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

# Prefect binds its console log handler to the sys.stderr of the moment it is
# first imported. Importing it here, before any test captures output, keeps it
# off a per-test capsys stream that is closed when that test ends. A Python
# without Prefect (a GPU machine's stock one) still runs the tests that need none
# (`pytest -m cuda`, see scripts/gpu-check.sh).
with contextlib.suppress(ImportError):
    import prefect  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def camvid_location() -> Path:
    """``FCN_CAMVID_ROOT`` if set, else the shared copy beside the project."""
    env = os.environ.get("FCN_CAMVID_ROOT")
    return Path(env) if env else REPO.parent / "shared" / "datasets" / "camvid"


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    root = camvid_location()
    if not (root / "trainannot").is_dir():
        if os.environ.get("FCN_REQUIRE_CAMVID"):
            pytest.fail(f"FCN_REQUIRE_CAMVID is set but CamVid is not at {root}")
        pytest.skip(
            f"CamVid not found at {root}: set FCN_CAMVID_ROOT to a SegNet-layout copy "
            "(.ci/run points it at ../shared/datasets/camvid)"
        )
    return root


@pytest.fixture(scope="session")
def camvid_ingested(camvid_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CamVid ingested once per test session (about 5 s on 2 cores)."""
    from fcn_pipeline.config import DataParams
    from fcn_pipeline.ingest import ingest

    out = tmp_path_factory.mktemp("camvid") / "ingested"
    ingest(DataParams(format="camvid", root=str(camvid_root), shard_size=64), out)
    return out


@pytest.fixture(scope="session")
def prefect_api_url() -> str:
    """One Prefect API server for the whole session (real server, SQLite, loopback).

    Tests that run flows in-process share it; tests that start subprocesses
    (the CLI, ``dvc repro``) pass its URL in ``PREFECT_API_URL`` so they do not
    each start a temporary server.
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def project_env(prefect_api_url: str | None = None) -> dict[str, str]:
    """Environment for subprocesses: the venv first on PATH, and the shared Prefect API
    when given; without one, no Prefect API at all and Prefect's temporary server
    forbidden, so a command that should be a plain program fails if it reaches for
    Prefect."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(os.sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if prefect_api_url is None:
        env.pop("PREFECT_API_URL", None)
        env["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "false"
    else:
        env["PREFECT_API_URL"] = prefect_api_url
    return env


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """A copy of the project's files in its own git repository (for DVC)."""
    return copy_project(tmp_path / "project")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataset, its stats and patches (``ingested/``, ``stats/``,
    ``patches/`` under the returned directory): 8 train, 4 val, 4 test images of 48x64."""
    from fcn_pipeline.config import DataParams, PatchesParams, StatsParams, SyntheticParams
    from fcn_pipeline.ingest import ingest
    from fcn_pipeline.patches import extract_patches

    root = tmp_path_factory.mktemp("tiny")
    synthetic = SyntheticParams(height=48, width=64, splits={"train": 8, "val": 4, "test": 4})
    ingest(DataParams(workers=1, shard_size=3, synthetic=synthetic), root / "ingested")
    compute_stats(StatsParams(data=str(root / "ingested"), workers=1), root / "stats")
    extract_patches(
        PatchesParams(
            data=str(root / "ingested"), stats=str(root / "stats"), workers=1, patches_per_image=4
        ),
        root / "patches",
    )
    return root


def copy_project(dest: Path) -> Path:
    """Copy the project's files into ``dest`` as its own git repository (one commit).

    Serves ``project_copy`` and fixtures of a wider scope (a module-wide copy
    shared by the tests of a running Prefect server, for instance).
    """
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    for name in files:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for command in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "config", "user.name", "test"],
        ["git", "config", "user.email", "test@example.invalid"],
        ["git", "add", "-A"],
        ["git", "commit", "-q", "-m", "copy"],
    ):
        subprocess.run(command, cwd=dest, check=True)
    return dest


def tiny_project(project: Path, fcn8s_epochs: int = 1, overlays: int = 2) -> dict:
    """The project copy's params.yaml at a tiny size (4/2/2 synthetic images of 48x64, one
    epoch per net, width 1/32), written; returns it as a dict for further edits."""
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["synthetic"].update(
        height=48, width=64, splits={"train": 4, "val": 2, "test": 2}
    )
    params["data"]["workers"] = params["stats"]["workers"] = params["patches"]["workers"] = 1
    params["patches"]["patches_per_image"] = 2
    params["train"].update(width=0.03125, batch_size=2, workers=0, device="cpu")
    params["epochs"] = {"fcn32s": 1, "fcn16s": 1, "fcn8s": fcn8s_epochs}
    params["evaluate"].update(workers=0, overlays=overlays, device="cpu")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def tiny_params_file(tiny_data: Path, directory: Path, ingest_to: Path | None = None) -> Path:
    """``directory/params.yaml``: its train and evaluate stages run in seconds on
    :func:`tiny_data` (its ingested data, stats and patches) and write under
    ``directory``. ``ingest_to``: the ingest stage writes 4/2/2 images of 48x64 there
    instead, and the later stages read them."""
    import yaml

    settings = yaml.safe_load((REPO / "params.yaml").read_text())
    settings["data"].update(out=str(ingest_to or tiny_data / "ingested"), workers=1)
    settings["data"]["synthetic"].update(
        height=48, width=64, splits={"train": 4, "val": 2, "test": 2}
    )
    settings["stats"]["out"] = str(tiny_data / "stats")
    settings["patches"]["out"] = str(tiny_data / "patches")
    settings["train"].update(
        out=str(directory / "models"), live=str(directory / "dvclive"), width=0.03125,
        device="cpu", workers=0, batch_size=4,
    )  # fmt: skip
    settings["epochs"] = {"fcn32s": 2, "fcn16s": 1, "fcn8s": 1}
    settings["evaluate"].update(
        metrics=str(directory / "metrics"), out=str(directory / "evaluation"), device="cpu",
        workers=0, overlays=1,
    )  # fmt: skip
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def compute_stats(params, out, **count_options):
    """The stats stage without Prefect: count ``params.data``, write ``out``."""
    from fcn_pipeline.stats import count_classes, write_stats

    return write_stats(count_classes(params.data, params.workers, **count_options), out)


def perturb_weights(model, std: float):
    """``model`` with Gaussian noise of ``std`` added to every weight, in place: a fresh
    FCN's score layers are zero, and a net predicting one class everywhere cannot tell a
    right computation from a wrong one."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * std)
    return model


def predicted_classes(hist) -> int:
    """How many classes a ``(K, K)`` confusion histogram's predictions (columns) use."""
    return int((hist.sum(0) > 0).sum())
