"""params.yaml schema: every bad key fails before work, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fcn_pipeline.config import Params, load_params, parse_params
from fcn_pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.data.format == "synthetic"
    assert params.data.synthetic.classes[0] == "background"


@pytest.mark.parametrize(
    ("tree", "key", "words"),
    [
        ({"data": {"shard_size": 0}}, "data.shard_size", "greater than or equal to 1"),
        ({"data": {"shard_size": "64"}}, "data.shard_size", "valid integer"),
        ({"data": {"sharding": 3}}, "data.sharding", "unknown key"),
        ({"dataa": {}}, "dataa", "unknown key"),
        ({"data": {"format": "coco"}}, "data.format", "'synthetic'"),
        ({"data": {"scale": 0}}, "data.scale", "greater than 0"),
        ({"data": {"scale": 1.5}}, "data.scale", "less than or equal to 1"),
        ({"data": {"resample": "cubic"}}, "data.resample", "'area'"),
        ({"data": {"synthetic": {"height": 8}}}, "data.synthetic.height", "greater than"),
        (
            {"data": {"synthetic": {"classes": ["bus", "background"]}}},
            "data.synthetic.classes",
            "first class",
        ),
        (
            {"data": {"synthetic": {"classes": ["background", "cat"]}}},
            "data.synthetic.classes",
            "'pole'",
        ),
        ({"data": {"synthetic": {"splits": {"train": 0}}}}, "data.synthetic.splits", "at least 1"),
        ({"data": {"synthetic": {"splits": {"holdout": 3}}}}, "data.synthetic.splits", "holdout"),
        (
            {"data": {"synthetic": {"pole_width": [4, 2]}}},
            "data.synthetic.pole_width",
            "low <= high",
        ),
        (
            {"data": {"folder": {"split_fractions": {"train": 0.5}}}},
            "data.folder.split_fractions",
            "sum to 1",
        ),
    ],
)
def test_invalid_values_name_the_key(tree, key, words):
    with pytest.raises(ConfigError) as caught:
        parse_params(tree, source="params.yaml")
    message = str(caught.value)
    assert message.startswith("params.yaml: invalid parameters")
    assert f"  {key}" in message
    assert words in message


def test_overrides_are_applied_and_validated():
    params = parse_params({}, overrides={"data.shard_size": 7, "data.synthetic.seed": 3})
    assert params.data.shard_size == 7 and params.data.synthetic.seed == 3
    with pytest.raises(ConfigError, match=r"data\.workers"):
        parse_params({}, overrides={"data.workers": -1})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(listy)


def test_model_choices_of_the_schema_are_the_models_own():
    from typing import get_args

    from fcn_pipeline import config, models

    assert set(get_args(config.UpsampleMode)) == set(models.UPSAMPLE_MODES)
    assert set(get_args(config.Geometry)) == set(models.GEOMETRIES)
    assert set(get_args(config.Norm)) == set(models.NORMS)


@pytest.mark.parametrize(("key", "value"), [("train.geometry", "valid"), ("train.norm", "group")])
def test_unknown_geometry_or_norm_is_refused_naming_the_key_and_choices(key, value):
    with pytest.raises(
        ConfigError,
        match=rf"{key}: Input should be 'paper' or 'same'|{key}: Input should be 'none' or 'batch'",
    ):
        parse_params({}, overrides={key: value})


# --- one override syntax ------------------------------------------------------------


def leaf_keys(model, prefix: str = "") -> dict[str, object]:
    """Every dotted key of a params model and its value (dicts are values, as in YAML)."""
    from pydantic import BaseModel

    keys: dict[str, object] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            keys.update(leaf_keys(value, f"{prefix}{name}."))
        else:
            keys[f"{prefix}{name}"] = value
    return keys


def test_every_params_key_is_reachable_from_its_stage_command():
    """`fcn-pipeline <stage> -S key=value` reaches every key of the groups the stage reads."""
    import importlib

    from fcn_pipeline.config import DERIVED_PATHS
    from flows.cli import STAGE_COMMANDS, build_parser, collect_overrides

    defaults = {k: v for k, v in leaf_keys(Params()).items() if k not in DERIVED_PATHS}
    reached = set()
    for stage in STAGE_COMMANDS:
        groups = importlib.import_module(f"flows.{stage}").PARAMS
        variant = ["--variant", "fcn8s"] if stage in ("train", "evaluate") else []
        for key, value in defaults.items():
            if key.split(".")[0] not in groups:
                continue
            plain = list(value) if isinstance(value, tuple) else value
            text = yaml.safe_dump(plain, default_flow_style=True).strip().removesuffix("...")
            args = build_parser().parse_args([stage, *variant, "-S", f"{key}={text.strip()}"])
            overrides = collect_overrides(args)
            assert list(overrides) == [key], (stage, key)
            loaded = load_params(REPO / "params.yaml", overrides)
            for part in key.split("."):
                loaded = getattr(loaded, part)
            assert loaded == value, (stage, key, text)
            reached.add(key)
    assert reached == set(defaults)  # every group is some stage's


def test_one_key_value_syntax_names_what_is_wrong():
    from fcn_pipeline.config import parse_override

    assert parse_override("train.lr=0.01") == ("train.lr", 0.01)
    assert parse_override("train.upsample=frozen") == ("train.upsample", "frozen")
    assert parse_override("train.pretrained=null") == ("train.pretrained", None)
    assert parse_override("data.synthetic.splits={train: 2}") == (
        "data.synthetic.splits", {"train": 2},
    )  # fmt: skip
    for bad in ("train.lr", "=1", "train..lr=1", "1train=2"):
        with pytest.raises(ConfigError, match=r"expected key=value"):
            parse_override(bad)


def test_each_path_has_one_home_the_stage_that_writes_it():
    """Moving the ingested data is one edit: every stage reads data.out; a reader's own
    copy of a path is refused, naming the key to set instead."""
    moved = load_params(REPO / "params.yaml", {"data.out": "elsewhere/ingested",
                                                 "stats.out": "elsewhere/stats",
                                                 "train.out": "elsewhere/models"})  # fmt: skip
    assert moved.stats.data == moved.patches.data == moved.train.data == "elsewhere/ingested"
    assert moved.evaluate.data == "elsewhere/ingested"
    assert moved.patches.stats == moved.train.stats == "elsewhere/stats"
    assert moved.evaluate.models == "elsewhere/models"
    assert moved.train.patches == Params().patches.out
    text = (REPO / "params.yaml").read_text()
    assert text.count("data/ingested") == 1 and text.count("data/stats") == 1
    with pytest.raises(ConfigError, match=r"train\.data: not a parameter: .* set data\.out"):
        load_params(REPO / "params.yaml", {"train.data": "x"})
    with pytest.raises(ConfigError, match=r"\n  data: .*got 3"):  # not a group: named, no crash
        parse_params({"data": 3})
