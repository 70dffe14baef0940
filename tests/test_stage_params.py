"""params.yaml, the schema's defaults and dvc.yaml's per-stage params agree."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from fcn_pipeline.config import Params, load_params
from flows.stages import stage_params

REPO = Path(__file__).resolve().parents[1]


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_module(stage: dict):
    """The flow module a stage's command runs: ``fcn-pipeline <name> ...`` -> flows.<name>."""
    cmd = stage.get("do", stage)["cmd"].split()
    assert cmd[0] == "fcn-pipeline", cmd
    return importlib.import_module(f"flows.{cmd[1]}")


def test_code_defaults_equal_params_yaml():
    assert Params() == load_params(REPO / "params.yaml")


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_each_stage_declares_exactly_the_groups_its_flow_reads(name):
    stage = dvc_stages()[name]
    declared = stage.get("do", stage)["params"]
    read = stage_module(stage).PARAMS
    # A group is declared whole, or (foreach stages) only the entry of the stage's own item.
    covered = {entry.split(".")[0] for entry in declared}
    assert covered == set(read), (name, declared, read)
    for entry in declared:
        assert entry in read or entry.endswith(".${key}"), (name, entry)


def test_a_stage_cannot_read_a_group_it_does_not_declare():
    params = stage_params(str(REPO / "params.yaml"), None, ("stats",))
    assert params.stats == load_params(REPO / "params.yaml").stats
    with pytest.raises(AttributeError):
        _ = params.train
