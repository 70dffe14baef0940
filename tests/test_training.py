"""Training: staged variants, patch mode, determinism, resume, and bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fcn_pipeline.training as training
from fcn_pipeline.checkpoints import (
    CHECKPOINT_FILE,
    MODEL_FILE,
    load_model,
    model_record,
    save_file,
)
from fcn_pipeline.class_weights import load_class_weights
from fcn_pipeline.config import ConfigError, TrainParams, parse_params
from fcn_pipeline.errors import CheckpointError, DatasetError, TrainingDivergedError
from fcn_pipeline.training import build_criterion, poly_factor, train_variant
from flows.cli import main as cli_main


def tiny_params(tiny_data: Path, out: Path, **changes) -> TrainParams:
    settings = {
        "data": str(tiny_data / "ingested"),
        "patches": str(tiny_data / "patches"),
        "stats": str(tiny_data / "stats"),
        "out": str(out),
        "width": 0.03125,
        "batch_size": 4,
        "eval_batch_size": 4,
        "device": "cpu",
        "workers": 0,
        "seed": 3,
        **changes,
    }
    return TrainParams(**settings)


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def model_state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def test_same_params_and_seed_give_identical_models_and_metrics(tiny_data, tmp_path):
    runs = [
        train_variant(
            tiny_params(tiny_data, tmp_path / name, loss_sampling=0.5, hflip=True), "fcn32s", 1
        )
        for name in ("a", "b")
    ]
    assert runs[0].history[0]["train_loss"] == runs[1].history[0]["train_loss"]
    for key in ("val_mean_iu", "val_pixel_acc"):
        assert runs[0].history[0][key] == runs[1].history[0][key]
    assert state_dicts_equal(model_state(runs[0].model_path), model_state(runs[1].model_path))
    # A different seed trains a different net.
    other = train_variant(tiny_params(tiny_data, tmp_path / "c", seed=4), "fcn32s", 1)
    assert not state_dicts_equal(model_state(other.model_path), model_state(runs[0].model_path))


def test_staged_training_starts_each_variant_from_the_coarser_model(tiny_data, tmp_path):
    params = tiny_params(tiny_data, tmp_path)
    train_variant(params, "fcn32s", 1)
    # 0 epochs: FCN-16s is exactly its initialisation from FCN-32s.
    result = train_variant(params, "fcn16s", 0)
    fcn32s, fcn16s = model_state(tmp_path / "fcn32s" / MODEL_FILE), model_state(result.model_path)
    for key in fcn32s:
        if key in fcn16s:
            assert torch.equal(fcn32s[key], fcn16s[key]), key
    assert not fcn16s["score_pool4.weight"].any()  # new skip starts at zero
    fcn8s = train_variant(params, "fcn8s", 1)
    assert load_model(fcn8s.model_path).variant == "fcn8s"


def test_at_once_trains_fcn8s_without_a_coarser_model(tiny_data, tmp_path):
    result = train_variant(tiny_params(tiny_data, tmp_path, at_once=True), "fcn8s", 1)
    assert result.variant == "fcn8s_atonce"
    assert load_model(result.model_path).variant == "fcn8s_atonce"


def test_patch_mode_trains_on_the_patches(tiny_data, tmp_path):
    full = train_variant(tiny_params(tiny_data, tmp_path / "full"), "fcn32s", 1)
    patch = train_variant(tiny_params(tiny_data, tmp_path / "patch", mode="patch"), "fcn32s", 1)
    assert full.history[0]["train_images"] == 8  # whole images
    assert patch.history[0]["train_images"] == 32  # 8 images x 4 patches of 32x32


class InterruptError(Exception):
    """Stands for a kill between two epochs."""


def test_an_interrupted_run_resumes_from_its_last_epoch(tiny_data, tmp_path):
    reference = train_variant(tiny_params(tiny_data, tmp_path / "ref"), "fcn32s", 3)

    params = tiny_params(tiny_data, tmp_path / "run")

    def kill_after_first_epoch(epoch: int, metrics: dict) -> None:
        if epoch == 1:
            raise InterruptError

    with pytest.raises(InterruptError):
        train_variant(params, "fcn32s", 3, on_epoch_end=kill_after_first_epoch)
    assert (tmp_path / "run" / "fcn32s" / CHECKPOINT_FILE).is_file()
    assert not (tmp_path / "run" / "fcn32s" / MODEL_FILE).exists()

    seen: list[int] = []
    resumed = train_variant(params, "fcn32s", 3, on_epoch_end=lambda e, m: seen.append(e))
    assert resumed.resumed_from == 1
    assert seen == [1, 2, 3]  # epoch 1 replayed from the checkpoint, then 2 and 3 trained
    assert [h["train_loss"] for h in resumed.history] == [
        h["train_loss"] for h in reference.history
    ]
    assert state_dicts_equal(model_state(resumed.model_path), model_state(reference.model_path))


def test_a_checkpoint_of_other_params_is_not_resumed(tiny_data, tmp_path):
    train_variant(tiny_params(tiny_data, tmp_path), "fcn32s", 1)
    again = train_variant(tiny_params(tiny_data, tmp_path, lr=5e-4), "fcn32s", 1)
    assert again.resumed_from == 0


def test_class_weights_come_from_the_stats_output(tiny_data, tmp_path):
    params = tiny_params(tiny_data, tmp_path, class_weighting="median_frequency")
    names = ["background", "bus", "disc", "triangle", "checker", "pole"]
    weights = build_criterion(params, names, 32).class_weights
    expected, _ = load_class_weights(tiny_data / "stats", "median_frequency", names)
    assert torch.allclose(weights.double(), torch.from_numpy(expected).double(), rtol=1e-6)
    assert build_criterion(tiny_params(tiny_data, tmp_path), ["a", "b"], 32).class_weights is None
    with pytest.raises(DatasetError, match="differ from the dataset's"):
        build_criterion(params, ["a", "b"], 32)
    result = train_variant(params, "fcn32s", 1)
    assert result.history[0]["train_images"] == 8


def test_missing_stats_file_is_a_clear_error(tiny_data, tmp_path):
    params = tiny_params(
        tiny_data, tmp_path / "m", stats=str(tmp_path / "no-stats"), class_weighting="enet"
    )
    with pytest.raises(DatasetError, match=r"stats\.json"):
        train_variant(params, "fcn32s", 1)
    assert not (tmp_path / "m").exists()


def test_missing_or_mismatched_coarser_model_is_a_clear_error(tiny_data, tmp_path):
    params = tiny_params(tiny_data, tmp_path)
    with pytest.raises(CheckpointError, match=r"fcn32s/model\.pt: not found"):
        train_variant(params, "fcn16s", 1)
    # An FCN-32s trained on 3 classes cannot start a 6-class FCN-16s.
    model = training.build_fcn("fcn32s", 3, width=0.03125)
    save_file(tmp_path / "fcn32s" / MODEL_FILE, model_record(model, ["a", "b", "c"]))
    with pytest.raises(CheckpointError, match="3 classes"):
        train_variant(params, "fcn16s", 1)
    assert not (tmp_path / "fcn16s" / MODEL_FILE).exists()


def test_corrupt_checkpoint_is_a_clear_error_and_overwrites_nothing(tiny_data, tmp_path):
    params = tiny_params(tiny_data, tmp_path)
    train_variant(params, "fcn32s", 1)
    model_file = tmp_path / "fcn32s" / MODEL_FILE
    before = model_file.read_bytes()
    checkpoint = tmp_path / "fcn32s" / CHECKPOINT_FILE
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=re.escape(f"{checkpoint}: corrupt")):
        train_variant(params, "fcn32s", 1)
    assert model_file.read_bytes() == before
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(checkpoint)


def test_nan_loss_stops_with_the_step_and_learning_rate(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "fcn_pipeline.losses.segmentation_loss",
        lambda logits, *a, **k: logits.sum() * float("nan"),
    )
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step 0 .*learning rate"):
        train_variant(tiny_params(tiny_data, tmp_path), "fcn32s", 1)
    assert not (tmp_path / "fcn32s" / MODEL_FILE).exists()


def one_epoch_setup(tiny_data: Path, tmp_path: Path) -> tuple:
    """FCN-32s, its criterion, optimizer, scheduler and a 4-step loader (batch 2)."""
    from fcn_pipeline.data import SegmentationDataset, train_loader
    from fcn_pipeline.models import build_fcn

    params = tiny_params(tiny_data, tmp_path, batch_size=2)
    dataset = SegmentationDataset(tiny_data / "ingested", "train")
    loader = train_loader(dataset, 2, seed=1, workers=0, drop_last=True)
    torch.manual_seed(0)
    model = build_fcn("fcn32s", dataset.num_classes, width=params.width)
    criterion = build_criterion(params, dataset.meta.class_names, model.output_stride)
    optimizer = training.build_optimizer(model, params)
    scheduler = training.build_scheduler(optimizer, params, len(loader))
    return model, criterion, optimizer, scheduler, loader


def test_reading_the_loss_every_few_steps_changes_nothing(tiny_data, tmp_path):
    """CUDA reads the loss back every LOSS_CHECK_STEPS steps (one synchronisation, not
    one per step): the epoch's loss and the trained weights are those of a read per step."""
    runs = []
    for every in (1, 3):
        model, criterion, optimizer, scheduler, loader = one_epoch_setup(tiny_data, tmp_path)
        assert len(loader) == 4  # a read after step 3, and the last one at the end
        stats = training.train_one_epoch(
            model, criterion, optimizer, scheduler, loader, torch.device("cpu"), 1,
            loss_check_steps=every,
        )  # fmt: skip
        runs.append((stats, model.state_dict()))
    assert runs[0][0].loss == runs[1][0].loss and runs[0][0].images == runs[1][0].images == 8
    assert state_dicts_equal(runs[0][1], runs[1][1])


def test_a_late_read_of_the_loss_still_names_the_first_nan_step(tiny_data, tmp_path):
    model, criterion, optimizer, scheduler, loader = one_epoch_setup(tiny_data, tmp_path)
    calls = []

    def poisoned(logits, target):  # the third step's loss is NaN
        calls.append(len(calls))
        loss = criterion(logits, target)
        return loss * float("nan") if len(calls) == 3 else loss

    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step 2 \(epoch 1, batch 2\)"):
        training.train_one_epoch(
            model, poisoned, optimizer, scheduler, loader, torch.device("cpu"), 1,
            loss_check_steps=4,
        )  # fmt: skip
    assert len(calls) == 4  # read once, after the fourth step, not after each


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_the_optimizer_step_is_fused_on_cuda_only(tiny_data, tmp_path, optimizer):
    """The fused step serves CUDA; on the CPU the default loop keeps runs bit-identical."""
    from fcn_pipeline.models import build_fcn

    params = tiny_params(tiny_data, tmp_path, optimizer=optimizer)
    model = build_fcn("fcn32s", 6, width=params.width)  # on the CPU
    assert not training.build_optimizer(model, params).defaults.get("fused")
    assert training.build_optimizer(model, params, fused=True).defaults["fused"] is True


def test_poly_schedule():
    assert poly_factor(0, 10, 0.9) == 1.0
    assert poly_factor(5, 10, 1.0) == 0.5
    assert poly_factor(10, 10, 0.9) == 0.0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.mode", "tiles", "train.mode"),
        ("train.class_weighting", "sqrt", "train.class_weighting"),
        ("train.loss_sampling", 0.0, "train.loss_sampling"),
        ("train.loss_sampling", 1.5, "train.loss_sampling"),
        ("train.optimizer", "lbfgs", "train.optimizer"),
        ("epochs.fcn64s", 3, "epochs.fcn64s"),
        ("epochs.fcn8s", -1, "epochs.fcn8s"),
        ("evaluate.split", "dev", "evaluate.split"),
    ],
)
def test_bad_train_params_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_params({}, overrides={key: value})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--variant", "fcn64s"], "unknown variant 'fcn64s'"),
        (["train", "--variant", "fcn32s", "--loss-sampling", "0"], "train.loss_sampling"),
        (["train", "--variant", "fcn32s", "--mode", "tiles"], "train.mode"),
        (["evaluate", "--variant", "fcn4s"], "unknown variant 'fcn4s'"),
    ],
)
def test_cli_rejects_bad_input_before_any_work(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    assert cli_main(argv) == 1
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "params.yaml"]


def test_hflip_mirrors_each_image_with_its_own_mask():
    torch.manual_seed(0)
    images = torch.arange(64 * 3 * 2 * 5, dtype=torch.float32).reshape(64, 3, 2, 5)
    masks = torch.arange(64 * 2 * 5).reshape(64, 2, 5) % 7
    flipped_images, flipped_masks = training.random_hflip(images, masks)
    mirrored = [torch.equal(flipped_images[i], images[i].flip(-1)) for i in range(64)]
    for i in range(64):
        expected = masks[i].flip(-1) if mirrored[i] else masks[i]
        assert torch.equal(flipped_masks[i], expected)
        assert mirrored[i] or torch.equal(flipped_images[i], images[i])
    assert 16 < sum(mirrored) < 48  # about half, drawn per image


def test_same_geometry_with_batch_norm_trains_staged_and_reloads(tiny_data, tmp_path):
    params = tiny_params(tiny_data, tmp_path, geometry="same", norm="batch", hflip=True)
    for variant in ("fcn32s", "fcn16s", "fcn8s"):
        result = train_variant(params, variant, 1)
        model = load_model(result.model_path)
        assert (model.geometry, model.norm) == ("same", "batch")
        assert 0.0 <= result.history[-1]["val_mean_iu"] <= 1.0
    # A paper-geometry FCN-16s cannot start from this same-geometry FCN-32s.
    with pytest.raises(CheckpointError, match="retrain the coarser variant"):
        train_variant(tiny_params(tiny_data, tmp_path, geometry="paper", norm="none"), "fcn16s", 1)
