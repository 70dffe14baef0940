"""Using a trained model: predict on new images, export to ONNX / TorchScript, parity."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcn_pipeline.checkpoints import model_record, save_file
from fcn_pipeline.errors import CheckpointError
from fcn_pipeline.models import build_fcn
from fcn_pipeline.predict import (
    InputError,
    collect_inputs,
    load_scorer,
    normalize,
    predict,
    predict_tiled,
    predict_whole,
    tile_starts,
)
from fcn_pipeline.store import decode_mask
from tests.conftest import perturb_weights

REPO = Path(__file__).resolve().parents[1]
NAMES = ["background", "bus", "disc", "triangle", "checker", "pole"]
COLORS = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]]


def random_model(path: Path, variant: str = "fcn8s", geometry: str = "same", seed: int = 0):
    """A net whose every layer, score layers included, has non-zero random weights (a
    freshly built FCN's score layers are zero and would make every output equal)."""
    torch.manual_seed(seed)
    model = build_fcn(variant, len(NAMES), width=0.0625, geometry=geometry, norm="batch",
                      upsample="learned")  # fmt: skip
    perturb_weights(model, 0.05)
    save_file(path, model_record(model.eval(), NAMES, class_colors=COLORS))
    return model.eval()


def write_images(folder: Path, sizes: list[tuple[int, int]], prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"{prefix}{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# --- inputs ---------------------------------------------------------------------------


def test_inputs_are_found_by_content_in_directories_and_globs(tmp_path):
    images = write_images(tmp_path / "in" / "sub", [(8, 8), (8, 8)])
    jpeg = tmp_path / "in" / "photo.JPG.bak"  # the name says nothing: the bytes do
    Image.new("RGB", (5, 5)).save(jpeg, format="JPEG")
    (tmp_path / "in" / "notes.png").write_text("not an image")  # skipped in a directory
    found = collect_inputs([str(tmp_path / "in")])
    assert sorted(str(item.name) for item in found) == ["photo.JPG.bak", "sub/img0.png",
                                                         "sub/img1.png"]  # fmt: skip
    globbed = collect_inputs([str(tmp_path / "in" / "**" / "*.png")])
    assert sorted(str(item.name) for item in globbed) == ["sub/img0.png", "sub/img1.png"]
    assert [item.path for item in collect_inputs([str(images[0])])] == [images[0]]
    with pytest.raises(InputError, match="no such file"):
        collect_inputs([str(tmp_path / "missing")])


def test_two_inputs_on_one_output_name_are_refused_naming_both(tmp_path):
    first = write_images(tmp_path / "a", [(4, 4)])[0]
    second = write_images(tmp_path / "b", [(4, 4)])[0]
    with pytest.raises(InputError) as caught:
        collect_inputs([str(first), str(second)])
    assert str(first) in str(caught.value) and str(second) in str(caught.value)


def test_tile_starts_cover_the_axis_and_end_flush():
    assert tile_starts(100, 192, 128) == [0]
    assert tile_starts(500, 192, 128) == [0, 128, 256, 308]
    assert tile_starts(192, 192, 64) == [0]


# --- predicting -----------------------------------------------------------------------


def test_masks_are_palette_pngs_of_the_class_indices(tmp_path):
    model = random_model(tmp_path / "model.pt")
    images = write_images(tmp_path / "in", [(37, 53), (37, 53), (20, 30)])
    result = predict(tmp_path / "model.pt", [str(tmp_path / "in")], tmp_path / "out",
                     overlay=True, device="cpu", log=lambda _: None)  # fmt: skip
    assert result.images == 3
    for path in images:
        out = tmp_path / "out" / path.name
        with Image.open(out) as mask:
            assert mask.mode == "P" and mask.getpalette()[:18] == [
                c for color in COLORS for c in color
            ]
        labels = decode_mask(out.read_bytes())
        pixels = np.asarray(Image.open(path).convert("RGB"))
        x = normalize(pixels, load_scorer(tmp_path / "model.pt", "cpu")[0])[None]
        with torch.no_grad():
            expected = model(x).argmax(1)[0].numpy()
        assert np.array_equal(labels, expected)
        assert (tmp_path / "out" / path.with_suffix(".overlay.jpg").name).read_bytes()[:2] == (
            b"\xff\xd8"
        )


def test_tiles_covering_the_image_once_give_the_whole_image_scores(tmp_path):
    """With one window the tiled path is the whole-image path; with overlapping windows
    every pixel still gets a class, and a flip averages two passes."""
    random_model(tmp_path / "model.pt", "fcn32s")
    info, scorer = load_scorer(tmp_path / "model.pt", "cpu")
    image = normalize(np.random.default_rng(0).integers(0, 256, (64, 80, 3), np.uint8), info)
    whole = predict_whole(scorer, image[None])[0]
    assert np.array_equal(predict_tiled(scorer, image, tile=96, overlap=0), whole)
    tiled = predict_tiled(scorer, image, tile=32, overlap=16)
    assert tiled.shape == (64, 80) and tiled.max() < len(NAMES)
    flipped = predict_whole(scorer, image[None], flip=True)[0]
    assert flipped.shape == whole.shape


@pytest.mark.parametrize("geometry", ["same", pytest.param("paper", marks=pytest.mark.slow)])
def test_tiles_with_the_nets_context_give_the_whole_image_masks(tmp_path, geometry):
    """Overlap-tile: each 96-pixel window predicted from a window 224 pixels wider on
    every side, cut on the pooling grid, keeps exactly the whole image's classes on an
    image much larger than one context window; without the context a random net's
    windows disagree on most pixels (so the equality is not a given)."""
    random_model(tmp_path / "model.pt", "fcn8s", geometry)
    info, scorer = load_scorer(tmp_path / "model.pt", "cpu")
    image = normalize(np.random.default_rng(0).integers(0, 256, (600, 700, 3), np.uint8), info)
    whole = predict_whole(scorer, image[None])[0]
    assert np.array_equal(predict_tiled(scorer, image, tile=96, overlap=32), whole)
    alone = predict_tiled(scorer, image, tile=96, overlap=32, context=0)
    assert (alone == whole).mean() < 0.9


def test_bad_inputs_give_one_error_naming_the_file_and_leave_no_partial_output(tmp_path):
    random_model(tmp_path / "model.pt")
    good = write_images(tmp_path / "in", [(16, 16)])[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / good.name).write_bytes(b"old mask")
    truncated = tmp_path / "in" / "cut.jpg"
    buffer = tmp_path / "full.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buffer, format="JPEG")
    truncated.write_bytes(buffer.read_bytes()[:200])
    text = tmp_path / "in" / "text.png"
    text.write_text("hello")
    for bad, reason in ((truncated, "corrupt or truncated"), (text, "not an image")):
        with pytest.raises(InputError, match=reason) as caught:
            predict(tmp_path / "model.pt", [str(bad)], out, log=lambda _: None)
        assert str(bad) in str(caught.value) and "\n" not in str(caught.value)
    assert sorted(p.name for p in out.iterdir()) == [good.name]  # nothing half-written
    assert (out / good.name).read_bytes() == b"old mask"
    result = predict(tmp_path / "model.pt", [str(good), str(truncated), str(text)], out,
                     keep_going=True, log=lambda _: None)  # fmt: skip
    assert result.images == 1 and [p for p, _ in result.failed] == [truncated, text]
    assert (out / good.name).read_bytes()[:4] == b"\x89PNG"  # replaced by a complete one


def test_a_file_that_is_not_a_model_is_named(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"nope")
    write_images(tmp_path / "in", [(8, 8)])
    with pytest.raises(CheckpointError, match=r"model\.pt: corrupt or not a PyTorch file"):
        predict(tmp_path / "model.pt", [str(tmp_path / "in")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- export and parity ----------------------------------------------------------------

SIZES = [(1, 1), (37, 53), (96, 128), (360, 480)]


def parity(tmp_path: Path, variant: str, geometry: str) -> None:
    pytest.importorskip("onnxruntime")
    from fcn_pipeline.export import export, torchscript_info

    model = random_model(tmp_path / "model.pt", variant, geometry)
    onnx_file = export(tmp_path / "model.pt", "onnx", tmp_path / "m.onnx")
    script_file = export(tmp_path / "model.pt", "torchscript", tmp_path / "m.ts")
    info, onnx_scorer = load_scorer(onnx_file)
    assert info.class_names == NAMES and info.class_colors == COLORS
    assert info.output_stride == model.output_stride
    assert torchscript_info(script_file).class_names == NAMES
    scripted = torch.jit.load(str(script_file))
    for height, width in SIZES:
        x = torch.randn(2, 3, height, width)
        with torch.no_grad():
            expected = model(x)
            assert (scripted(x) - expected).abs().max() < 1e-4, (height, width)
        assert (onnx_scorer(x) - expected).abs().max() < 1e-4, (height, width)


@pytest.mark.slow
@pytest.mark.parametrize("geometry", ["same", "paper"])
@pytest.mark.parametrize("variant", ["fcn32s", "fcn16s", "fcn8s"])
def test_onnx_and_torchscript_match_pytorch_every_variant_and_geometry(tmp_path, variant, geometry):
    parity(tmp_path, variant, geometry)


@pytest.mark.slow  # ONNX export: 4-5 s
def test_predict_from_onnx_gives_the_masks_of_model_pt_and_needs_its_metadata(tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from fcn_pipeline.export import export

    random_model(tmp_path / "model.pt")
    export(tmp_path / "model.pt", "onnx", tmp_path / "m.onnx")
    write_images(tmp_path / "in", [(37, 53), (48, 64), (48, 64)])
    for model, out in (("model.pt", "a"), ("m.onnx", "b")):
        predict(tmp_path / model, [str(tmp_path / "in")], tmp_path / out, device="cpu",
                log=lambda _: None)  # fmt: skip
    for name in ("img0.png", "img1.png", "img2.png"):
        assert np.array_equal(
            decode_mask((tmp_path / "a" / name).read_bytes()),
            decode_mask((tmp_path / "b" / name).read_bytes()),
        )
    # The same file without its metadata (class names, normalisation) is refused by name.
    graph = onnx.load(str(tmp_path / "m.onnx"))
    del graph.metadata_props[:]
    onnx.save(graph, str(tmp_path / "bare.onnx"))
    with pytest.raises(CheckpointError, match=r"bare\.onnx: no fcn-pipeline metadata"):
        predict(tmp_path / "bare.onnx", [str(tmp_path / "in")], tmp_path / "c")


def test_the_cli_predicts_prints_info_and_fails_in_one_line(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    random_model(tmp_path / "model.pt")
    write_images(tmp_path / "in", [(16, 24)])
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "model.pt", "in", "--out", "out"]) == 0
    assert (tmp_path / "out" / "img0.png").is_file()
    assert main(["predict", "--info", "model.pt"]) == 0
    assert '"class_names"' in capsys.readouterr().out
    # The installed command, as a user runs it: no link, one error line, no traceback.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    bad = subprocess.run(
        ["fcn-pipeline", "predict", "model.pt", "nothing-here", "--out", "out"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "View at" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        "fcn-pipeline predict: error: nothing-here: no such file or directory"
    )


# --- on CamVid: predict scores what evaluate scores ------------------------------------


@pytest.fixture(scope="module")
def camvid_model(camvid_ingested: Path, tmp_path_factory) -> Path:
    """A small FCN-8s (at once, width 1/32) trained one epoch on CamVid at full size."""
    from fcn_pipeline.config import TrainParams
    from fcn_pipeline.training import train_variant

    out = tmp_path_factory.mktemp("camvid-model")
    params = TrainParams(data=str(camvid_ingested), out=str(out), live=str(out / "live"),
                         width=0.03125, at_once=True, batch_size=8, eval_batch_size=8,
                         device="cpu", workers=0, lr=0.01)  # fmt: skip
    train_variant(params, "fcn8s", 1, log=lambda _: None)
    return out


def camvid_truth(camvid_root: Path, name: str) -> np.ndarray:
    from fcn_pipeline.sources.camvid import VOID_VALUE

    mask = np.array(Image.open(camvid_root / "testannot" / name))
    mask[mask == VOID_VALUE] = 255
    return mask


def scores_of_masks(folder: Path, camvid_root: Path, names: list[str]) -> dict:
    from fcn_pipeline.metrics import confusion_matrix, segmentation_scores

    hist = torch.zeros((11, 11), dtype=torch.int64)
    for name in names:
        pred = torch.from_numpy(decode_mask((folder / name).read_bytes()).astype(np.int64))
        truth = torch.from_numpy(camvid_truth(camvid_root, name).astype(np.int64))
        hist += confusion_matrix(pred, truth, 11)
    return segmentation_scores(hist)


@pytest.mark.slow
def test_predict_on_camvid_test_images_scores_what_evaluate_scores(
    camvid_model, camvid_ingested, camvid_root, tmp_path
):
    from fcn_pipeline.config import EvaluateParams
    from fcn_pipeline.evaluation import evaluate_variant

    params = EvaluateParams(data=str(camvid_ingested), models=str(camvid_model),
                            metrics=str(tmp_path / "metrics"), out=str(tmp_path / "eval"),
                            overlays=0, device="cpu", workers=0)  # fmt: skip
    evaluated = evaluate_variant(params, "fcn8s", log=lambda _: None)
    result = predict(
        camvid_model / "fcn8s" / "model.pt",
        [str(camvid_root / "test")],
        tmp_path / "masks",
        batch_size=16,
        device="cpu",
        log=lambda _: None,
    )
    names = sorted(p.name for p in (camvid_root / "test").iterdir())
    assert result.images == len(names) == 233
    predicted = scores_of_masks(tmp_path / "masks", camvid_root, names)
    assert predicted["mean_iu"] == evaluated.metrics["mean_iu"]
    assert predicted["pixel_acc"] == evaluated.metrics["pixel_acc"]


@pytest.mark.slow
def test_tiled_camvid_masks_agree_with_whole_image_masks(camvid_model, camvid_root, tmp_path):
    """--tile 192 --overlap 64 on a few 360x480 test images against whole-image masks:
    with the net's context (the default) the same masks and mean IU; without it
    (--context 0) this one-epoch, width-1/32 net, which looks far beyond a 192-pixel
    window, still agrees on most pixels (87 % measured); a window as large as the image
    is the whole-image prediction exactly."""
    names = sorted(p.name for p in (camvid_root / "test").iterdir())[::40]
    inputs = [str(camvid_root / "test" / name) for name in names]
    model = camvid_model / "fcn8s" / "model.pt"
    predict(model, inputs, tmp_path / "whole", device="cpu", log=lambda _: None)
    for name, tile, overlap, context in (("t192", 192, 64, 224), ("alone", 192, 64, 0),
                                         ("t480", 480, 0, 0)):  # fmt: skip
        predict(model, inputs, tmp_path / name, tile=tile, overlap=overlap, context=context,
                device="cpu", log=lambda _: None)  # fmt: skip
    same = total = 0
    for name in names:
        whole = decode_mask((tmp_path / "whole" / name).read_bytes())
        assert np.array_equal(decode_mask((tmp_path / "t480" / name).read_bytes()), whole)
        assert np.array_equal(decode_mask((tmp_path / "t192" / name).read_bytes()), whole)
        alone = decode_mask((tmp_path / "alone" / name).read_bytes())
        same += int((whole == alone).sum())
        total += whole.size
    assert same / total >= 0.85
    whole_iu = scores_of_masks(tmp_path / "whole", camvid_root, names)["mean_iu"]
    alone_iu = scores_of_masks(tmp_path / "alone", camvid_root, names)["mean_iu"]
    assert abs(whole_iu - alone_iu) <= 0.03
