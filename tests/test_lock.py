"""The environment is the locked one: scripts/bootstrap.sh installs requirements.lock, so
the packages that decide the synthetic data, the decoded pixels and the arithmetic of
the committed reference results have exactly the locked versions."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"
DECISIVE = ("numpy", "pillow", "scikit-image", "pyarrow", "torch", "torchvision", "scipy",
            "prefect", "dvc", "dvclive", "pydantic", "pyyaml")  # fmt: skip


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line):
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_the_lock_pins_every_decisive_package():
    pins = locked()
    assert set(DECISIVE) <= set(pins), set(DECISIVE) - set(pins)
    assert not [line for line in LOCK.read_text().splitlines() if " @ " in line]  # no URLs


@pytest.mark.parametrize("name", DECISIVE)
def test_installed_versions_are_the_locked_ones(name):
    try:
        installed = version(name)
    except PackageNotFoundError:
        pytest.fail(f"{name} is locked but not installed: run scripts/bootstrap.sh")
    assert installed == locked()[name], f"{name} {installed}, locked {locked()[name]}"
