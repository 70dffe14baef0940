"""Every failure is one clear line and loses nothing, whatever the cause.

Foreign errors (the operating system, Pillow, torch, odd file names) become the
project's errors naming the file or key; every stage fails with one
``fcn-pipeline <stage>: error:`` line and no traceback on the terminal; the
previous outputs stay byte for byte; a killed run's debris goes with the next run.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import fcn_pipeline.checkpoints as checkpoints
from fcn_pipeline.atomic import remove_stale
from fcn_pipeline.checkpoints import save_file
from fcn_pipeline.config import DataParams, EvaluateParams, SyntheticParams, parse_params
from fcn_pipeline.errors import CheckpointError, ConfigError, InvalidInputError, OutputError
from fcn_pipeline.evaluation import evaluate_variant
from fcn_pipeline.ingest import ingest
from fcn_pipeline.training import train_variant
from tests.conftest import REPO, project_env, tiny_params_file
from tests.test_ingest import make_camvid, make_folder, params, save_png
from tests.test_training import tiny_params

TINY = SyntheticParams(height=32, width=32, splits={"train": 3, "val": 2, "test": 2})


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def leftovers(directory: Path) -> list[str]:
    """Temporary siblings (``.<name>.tmp-...``, ``.<name>.old-...``) under ``directory``."""
    return sorted(p.name for p in directory.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


# --- sources: every file problem names the file in words ------------------------------


@pytest.mark.parametrize("layout", ["camvid", "folder"])
def test_two_files_with_one_image_id_are_an_error_naming_both(tmp_path, layout):
    root = tmp_path / "data"
    if layout == "camvid":
        make_camvid(root)
        first = root / "train" / "train_000.png"
    else:
        make_folder(root)
        first = root / "images" / "img0.png"
    other = first.with_suffix(".jpg")  # another picture, the same id
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(other)
    with pytest.raises(InvalidInputError) as caught:
        ingest(params(layout, root), tmp_path / "out")
    kept, dropped = sorted([first, other])  # in name order: .jpg, then .png
    assert f"{dropped}: same image id {first.stem!r} as {kept}" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_empty_and_non_image_files_say_what_they_are(tmp_path):
    root = tmp_path / "camvid"
    make_camvid(root)
    (root / "train" / "train_000.png").write_bytes(b"")
    (root / "val" / "val_000.png").write_bytes(b"hello, not a picture")
    (root / "trainannot" / "train_001.png").write_bytes(b"")
    with pytest.raises(InvalidInputError) as caught:
        ingest(params("camvid", root), tmp_path / "out")
    message = str(caught.value)
    assert f"{root / 'train' / 'train_000.png'}: image does not decode: empty file" in message
    assert (
        f"{root / 'val' / 'val_000.png'}: image does not decode: not an image format Pillow "
        "reads (file starts with b'hello, n')" in message
    )
    assert f"{root / 'trainannot' / 'train_001.png'}: mask does not decode: empty" in message
    assert "BytesIO" not in message


def test_an_image_over_pillows_size_limit_is_a_listed_problem(tmp_path, monkeypatch):
    root = tmp_path / "camvid"
    make_camvid(root, counts={"train": 1, "val": 1, "test": 1}, size=(20, 30))
    # 600 pixels: over twice this limit, which makes Pillow refuse the file outright.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 250)
    with pytest.raises(InvalidInputError) as caught:
        ingest(params("camvid", root), tmp_path / "out")  # workers=1: in this process
    message = str(caught.value)
    assert f"{root / 'trainannot' / 'train_000.png'}: mask does not decode: too large" in message
    assert "exceeds limit of 500 pixels" in message


def test_file_names_and_list_lines_that_are_not_utf8(tmp_path):
    root = tmp_path / "camvid"
    make_camvid(root)
    for directory in ("train", "trainannot"):  # a pair whose name is not UTF-8
        os.rename(
            os.fsencode(root / directory / "train_002.png"),
            os.fsencode(root / directory) + b"/train_\xff.png",
        )
    with pytest.raises(InvalidInputError) as caught:
        ingest(params("camvid", root), tmp_path / "out")
    message = str(caught.value)
    message.encode("utf-8")  # printable: no lone surrogates
    assert f"{root / 'train'}/train_\\xff.png: file name is not valid UTF-8" in message

    folder = tmp_path / "folder"
    make_folder(folder, splits={"train": ["img0", "img1"], "val": ["img2"]})
    (folder / "splits" / "train.txt").write_bytes(b"img0\nimg\xff1\n")
    with pytest.raises(InvalidInputError) as caught:
        ingest(params("folder", folder), tmp_path / "out")
    assert f"{folder / 'splits' / 'train.txt'}:2: not valid UTF-8" in str(caught.value)


# --- the operating system: the path and the cause, the previous output kept ----------------


def test_no_space_left_names_the_output_and_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "ingested"
    ingest(DataParams(workers=1, synthetic=TINY), out)
    before = snapshot(out)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "Error writing bytes to file: No space left on device")

    monkeypatch.setattr("fcn_pipeline.store.pq.write_table", full_disk)
    with pytest.raises(OutputError) as caught:
        ingest(DataParams(workers=1, synthetic=TINY), out)
    assert str(caught.value).startswith(f"{out}: cannot write: Error writing bytes")
    assert "No space left on device" in str(caught.value)
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_a_failed_torch_save_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "models" / "fcn32s" / "model.pt"
    save_file(path, {"format": "x", "weights": torch.ones(3)})
    before = path.read_bytes()

    def full_disk(content, f):  # what torch.save raises when the disk fills up
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    with pytest.raises(OutputError, match=rf"^{path}: cannot write \(disk full\?\)"):
        save_file(path, {"format": "x", "weights": torch.zeros(3)})
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_failed_evaluation_keeps_metrics_and_plots(tiny_data, tmp_path, monkeypatch):
    models = tmp_path / "models"
    train_variant(tiny_params(tiny_data, models), "fcn32s", 1)
    settings = EvaluateParams(
        data=str(tiny_data / "ingested"),
        models=str(models),
        metrics=str(tmp_path / "metrics"),
        out=str(tmp_path / "evaluation"),
        overlays=2,
        device="cpu",
        workers=0,
    )
    evaluate_variant(settings, "fcn32s")
    before = snapshot(tmp_path / "metrics"), snapshot(tmp_path / "evaluation")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fcn_pipeline.evaluation.overlay_png", full_disk)
    with pytest.raises(OutputError, match="evaluation/fcn32s: cannot write: No space left"):
        evaluate_variant(settings, "fcn32s")
    assert (snapshot(tmp_path / "metrics"), snapshot(tmp_path / "evaluation")) == before
    assert leftovers(tmp_path) == []


# --- a killed run's debris -------------------------------------------------------------


def test_a_killed_runs_temporary_directory_goes_with_the_next_run(tmp_path):
    out = tmp_path / "ingested"
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sys\n"
            "from fcn_pipeline.atomic import atomic_output_dir\n"
            "with atomic_output_dir(sys.argv[1]) as tmp:\n"
            "    (tmp / 'half-written.parquet').write_bytes(b'x' * 4096)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n",
            str(out),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert killed.returncode == -signal.SIGKILL
    assert [name.split("-")[0] for name in leftovers(tmp_path)] == [".ingested.tmp"]

    ingest(DataParams(workers=1, synthetic=TINY), out)
    assert leftovers(tmp_path) == []
    assert (out / "dataset.json").is_file()


def test_only_the_debris_of_dead_processes_is_removed(tmp_path):
    final = tmp_path / "out"
    alive = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        names = [
            f".out.tmp-{alive.pid}-0123abcd",  # a concurrent run: kept
            f".out.tmp-{dead.pid}-0123abcd",
            f".out.old-{dead.pid}-0123abcd",
            ".out.tmp-9f8e7d6c",  # written by an earlier version, without a pid
            f".other.tmp-{dead.pid}-0123abcd",  # another output's: not ours to judge
        ]
        for name in ["out", *names]:
            (tmp_path / name).mkdir()
        (tmp_path / f".out.tmp-{dead.pid}").write_bytes(b"half a model")  # a file, too
        removed = remove_stale(final)
        assert sorted(p.name for p in removed) == sorted([*names[1:4], f".out.tmp-{dead.pid}"])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", names[0], names[4]])
    finally:
        alive.kill()
        alive.wait()


def test_a_run_killed_during_its_swap_gets_its_previous_output_back(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    previous = tmp_path / f".out.old-{dead.pid}-0123abcd"  # `out` renamed aside ...
    previous.mkdir()
    (previous / "dataset.json").write_text("{}")
    (tmp_path / f".out.tmp-{dead.pid}-0123abcd").mkdir()  # ... the new one not yet in place
    remove_stale(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "dataset.json").read_text() == "{}"


# --- parameters and the pretrained backbone ---------------------------------------------


@pytest.mark.parametrize(
    ("train", "named"),
    [
        ({"lr": float("inf")}, "train.lr: Input should be a finite number"),
        ({"poly_power": float("nan")}, "train.poly_power: Input should be a finite number"),
        ({"pretrained": "vgg16.pth"}, "train.pretrained ('vgg16.pth') is the full VGG16 and needs"),
        (
            {"pretrained": "vgg16.pth", "width": 1.0, "norm": "batch"},
            "train.pretrained ('vgg16.pth') is VGG16 without BatchNorm: it needs train.norm none",
        ),
    ],
)
def test_the_schema_refuses_what_would_fail_later(train, named):
    with pytest.raises(ConfigError, match=r"invalid parameters") as caught:
        parse_params({"train": train})
    assert named in str(caught.value)


def _not_vgg16(path: Path) -> None:
    torch.save({"features.0.weight": torch.zeros(1)}, path)


def _random_bytes(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 4)


def _pickled_object(path: Path) -> None:
    import argparse

    torch.save(argparse.Namespace(a=1), path)  # a pickle weights_only=True refuses


def _wrong_shapes(path: Path) -> None:
    from fcn_pipeline.models.vgg16 import torchvision_vgg16_keys

    prefixes = torchvision_vgg16_keys()
    keys = [f"{prefix}.{kind}" for prefix in prefixes for kind in ("weight", "bias")]
    torch.save({key: torch.zeros(1) for key in keys}, path)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (None, "No such file or directory"),
        (Path.mkdir, "is not a torchvision VGG16 state dict"),
        (_random_bytes, "is not a torchvision VGG16 state dict"),
        (_pickled_object, "holds objects other than tensors"),
        (_not_vgg16, "is not a VGG16 state dict: missing key"),
        (_wrong_shapes, "has shape (1,), expected"),
    ],
)
def test_a_pretrained_file_that_does_not_fit_names_the_key_and_file(
    tiny_data, tmp_path, make, reason
):
    path = tmp_path / "vgg16.pth"
    if make:
        make(path)
    settings = tiny_params(
        tiny_data, tmp_path / "models", width=1.0, pretrained=str(path), norm="none"
    )
    with pytest.raises(CheckpointError) as caught:
        train_variant(settings, "fcn32s", 1)
    message = str(caught.value)
    assert message.startswith("train.pretrained: ") and str(path) in message
    assert reason in message
    # One line, and never PyTorch's advice to unpickle the file with weights_only=False.
    assert "\n" not in message and "weights_only" not in message
    assert not (tmp_path / "models").exists()


# --- the one error line ------------------------------------------------------------------


def test_an_unforeseen_error_is_one_line_and_its_traceback_is_on_request(
    tmp_path, capsys, monkeypatch
):
    import flows.cli
    import flows.stats

    def broken(params, variant, report):
        raise ZeroDivisionError("division by zero\nsecond line of detail")

    monkeypatch.setattr(flows.stats, "run", broken)
    params_file = tmp_path / "params.yaml"
    params_file.write_text("{}\n")
    assert flows.cli.main(["--params", str(params_file), "stats"]) == 1
    assert capsys.readouterr().err == (
        "fcn-pipeline stats: error: ZeroDivisionError: division by zero "
        "(--debug or FCN_DEBUG=1 shows the traceback)\n"
    )
    assert flows.cli.main(["--params", str(params_file), "--debug", "stats"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and "second line" in err
    assert err.endswith("fcn-pipeline stats: error: ZeroDivisionError: division by zero\n")
    monkeypatch.setenv("FCN_DEBUG", "1")
    assert flows.cli.main(["--params", str(params_file), "stats"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.delenv("FCN_DEBUG")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(flows.stats, "run", interrupted)
    assert flows.cli.main(["--params", str(params_file), "stats"]) == 130
    assert capsys.readouterr().err == (
        "fcn-pipeline stats: error: interrupted; the previous outputs are as they were\n"
    )
    # A study is not one atomic output: its line says what is left and how to restore.
    monkeypatch.setattr(flows.cli, "_study", interrupted)
    study_file = tmp_path / "s.yaml"
    study_file.write_text("settings: {a: []}\nseeds: [0]\n")
    assert flows.cli.main(["--params", str(params_file), "study", str(study_file)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "as they were" not in err
    assert "experiments that finished are kept" in err
    assert "git checkout -- . && dvc checkout" in err


def run_stage(cwd: Path, *argv: str, debug: bool = False) -> subprocess.CompletedProcess:
    """``fcn-pipeline ARGV`` in ``cwd`` (with the project's params.yaml), no Prefect API."""
    if not (cwd / "params.yaml").exists():
        shutil.copy(REPO / "params.yaml", cwd / "params.yaml")
    env = {**project_env(), "PYTHONPATH": str(REPO)}
    if debug:
        env["FCN_DEBUG"] = "1"
    else:
        env.pop("FCN_DEBUG", None)
    return subprocess.run(
        ["fcn-pipeline", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def error_lines(run: subprocess.CompletedProcess, stage: str) -> list[str]:
    """Assert one ``error:`` line and no traceback on stderr; return the error lines."""
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"fcn-pipeline {stage}: error: "), run.stderr
    return lines


@pytest.mark.slow
def test_a_failing_stage_shows_one_line_and_the_traceback_on_request(tmp_path):
    root = tmp_path / "camvid"
    make_camvid(root)
    out = tmp_path / "ingested"
    ingest(params("camvid", root), out)
    before = snapshot(out)
    mask = np.array(Image.open(root / "valannot" / "val_001.png"))
    mask[3, 4] = 200
    save_png(root / "valannot" / "val_001.png", mask)
    argv = ["ingest", "--format", "camvid", "--root", str(root), "--out", str(out),
            "--workers", "1"]  # fmt: skip

    run = run_stage(tmp_path, *argv)
    error_lines(run, "ingest")
    assert f"{root / 'valannot' / 'val_001.png'}: mask values [200] outside 0..11" in run.stderr
    assert "prefect" not in run.stderr.lower()  # a plain program: no run, no server, no link
    assert snapshot(out) == before and leftovers(tmp_path) == []

    debug = run_stage(tmp_path, *argv, debug=True)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    (line,) = error_lines(run, "ingest")
    assert debug.stderr.index("Traceback") < debug.stderr.index(line)
    assert snapshot(out) == before and leftovers(tmp_path) == []


@pytest.mark.slow
def test_an_output_under_a_regular_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    run = run_stage(tmp_path, "ingest", "--out", "a-file/data/ingested")
    (line,) = error_lines(run, "ingest")
    assert line == "fcn-pipeline ingest: error: a-file/data: Not a directory"


def test_a_successful_training_swaps_its_curves_in(tiny_data, tmp_path):
    from flows.stages import run_stage, stage_params
    from flows.train import PARAMS

    params_file = tiny_params_file(tiny_data, tmp_path)
    curves = tmp_path / "dvclive" / "fcn32s"
    curves.mkdir(parents=True)
    (curves / "metrics.json").write_text('{"step": 9}\n')  # an earlier run's
    run_stage("train", "fcn32s", stage_params(str(params_file), None, PARAMS))
    summary = yaml.safe_load((curves / "metrics.json").read_text())
    assert summary["step"] == 2 and 0.0 <= summary["val_mean_iu"] <= 1.0
    assert len((curves / "plots" / "metrics" / "val_mean_iu.tsv").read_text().splitlines()) == 3
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_failed_training_keeps_the_previous_curves(tiny_data, tmp_path):
    tiny_params_file(tiny_data, tmp_path)
    coarser = tmp_path / "models" / "fcn32s" / "model.pt"
    coarser.parent.mkdir(parents=True)
    coarser.write_bytes(b"\x00" * 100_000)  # `truncate -s 100000` of a model
    curves = tmp_path / "dvclive" / "fcn16s"
    (curves / "plots" / "metrics").mkdir(parents=True)
    (curves / "metrics.json").write_text('{"val_mean_iu": 0.5, "step": 3}\n')
    (curves / "plots" / "metrics" / "val_mean_iu.tsv").write_text("step\tval_mean_iu\n3\t0.5\n")
    before = snapshot(tmp_path / "dvclive")

    run = run_stage(tmp_path, "train", "--variant", "fcn16s")
    (line,) = error_lines(run, "train")
    assert f"{coarser}: corrupt or not a PyTorch file" in line
    assert snapshot(tmp_path / "dvclive") == before
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_under_dvc_repro_a_failure_is_one_line_and_dvc_checkout_restores(project_copy):
    env = {**project_env(), "PYTHONPATH": str(REPO)}
    env.pop("FCN_DEBUG", None)
    settings = yaml.safe_load((project_copy / "params.yaml").read_text())
    root = project_copy.parent / "camvid"
    make_camvid(root, counts={"train": 2, "val": 1, "test": 1})
    settings["data"].update(format="camvid", root=str(root), workers=1)
    (project_copy / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["dvc", *args], cwd=project_copy, env=env, capture_output=True, text=True, timeout=600
        )

    assert dvc("repro", "ingest").returncode == 0
    before = snapshot(project_copy / "data" / "ingested")
    lock = (project_copy / "dvc.lock").read_bytes()
    mask = root / "trainannot" / "train_001.png"
    save_png(mask, np.full((20, 30), 200, np.uint8))
    settings["data"]["shard_size"] = 1  # a parameter change: the stage is stale
    (project_copy / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))

    run = dvc("repro", "ingest")
    error_lines(run, "ingest")
    assert f"{mask}: mask values [200] outside 0..11" in run.stderr
    assert "failed to reproduce 'ingest'" in run.stderr
    assert (project_copy / "dvc.lock").read_bytes() == lock
    # `dvc repro` deleted the stage's outputs before running it; the cache has them.
    assert not (project_copy / "data" / "ingested").exists()
    assert dvc("checkout", "ingest").returncode == 0
    assert snapshot(project_copy / "data" / "ingested") == before


# --- paths that are not UTF-8 ------------------------------------------------------------


def test_a_non_utf8_image_name_is_named_with_its_byte_escaped(tmp_path):
    root = tmp_path / "data"
    make_folder(root)
    odd = Path(os.fsdecode(bytes(root / "images") + b"/img\xff9.png"))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(odd)
    with pytest.raises(InvalidInputError) as caught:
        ingest(params("folder", root), tmp_path / "out")
    message = str(caught.value)
    assert f"{root / 'images'}/img\\xff9.png: file name is not valid UTF-8" in message
    message.encode("utf-8")  # printable as it is
    assert not (tmp_path / "out").exists()


def test_a_params_file_that_is_not_utf8_is_named(tmp_path):
    from fcn_pipeline.config import load_params

    path = tmp_path / "params.yaml"
    path.write_bytes(b"data:\n  root: /data/\xff\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: not UTF-8 text \(byte 0xff at offset"):
        load_params(path)


def test_a_non_utf8_command_line_value_names_the_option_not_params_yaml(tmp_path):
    from fcn_pipeline.config import load_params

    root = os.fsdecode(b"/data/\xff")
    with pytest.raises(ConfigError) as caught:
        load_params(Path(__file__).resolve().parents[1] / "params.yaml", {"data.root": root})
    message = str(caught.value)
    assert message.startswith("data.root (command line): '/data/\\\\xff'")
    assert "params.yaml" not in message and len(message) < 200


def test_a_file_where_an_output_directory_goes_is_replaced_without_debris(tmp_path):
    from fcn_pipeline.atomic import atomic_output_dir

    final = tmp_path / "evaluation" / "fcn8s"
    final.parent.mkdir()
    final.write_text("a stray file")
    with atomic_output_dir(final) as tmp:
        (tmp / "metrics.json").write_text("{}")
    assert (final / "metrics.json").read_text() == "{}"
    assert sorted(p.name for p in final.parent.iterdir()) == ["fcn8s"]  # no .fcn8s.old-*
