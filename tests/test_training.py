"""Training: staged variants, patch mode, determinism, resume, and bad input."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import fcn_pipeline.convergence as convergence
import fcn_pipeline.training as training
from fcn_pipeline.checkpoints import (
    CHECKPOINT_FILE,
    LAST_MODEL_FILE,
    MODEL_FILE,
    load_model,
    model_record,
    save_file,
)
from fcn_pipeline.class_weights import load_class_weights
from fcn_pipeline.config import ConfigError, TrainParams, parse_params
from fcn_pipeline.epoch import random_hflip, train_one_epoch
from fcn_pipeline.errors import CheckpointError, DatasetError, TrainingDivergedError
from fcn_pipeline.schedules import build_scheduler, poly_factor
from fcn_pipeline.training import build_criterion, train_variant
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


def test_a_kept_checkpoint_resumes_a_run_whose_own_is_another_runs(tiny_data, tmp_path):
    """``resume_from``: a checkpoint a killed study kept aside, while the net's own file
    is another configuration's (``dvc exp run`` checks out the committed one first). A
    run killed after epoch 1 resumes from it to the uninterrupted run's weights; one
    killed after its last epoch writes its model.pt again byte for byte (the next net's
    fingerprint hashes that file)."""
    params, out = tiny_params(tiny_data, tmp_path / "run"), tmp_path / "run" / "fcn32s"
    reference = train_variant(params, "fcn32s", 3)
    weights = model_state(reference.model_path)
    shutil.rmtree(out)

    def kill_after_first_epoch(epoch: int, metrics: dict) -> None:
        if epoch == 1:
            raise InterruptError

    def keep_checkpoint_and_train_another() -> Path:
        kept = tmp_path / "kept" / str(len(list(tmp_path.glob("kept/*")))) / CHECKPOINT_FILE
        kept.parent.mkdir(parents=True)
        os.replace(out / CHECKPOINT_FILE, kept)
        train_variant(tiny_params(tiny_data, tmp_path / "run", lr=5e-4), "fcn32s", 1)
        return kept

    with pytest.raises(InterruptError):
        train_variant(params, "fcn32s", 3, on_epoch_end=kill_after_first_epoch)
    resumed = train_variant(params, "fcn32s", 3, resume_from=keep_checkpoint_and_train_another())
    assert resumed.resumed_from == 1
    assert state_dicts_equal(model_state(resumed.model_path), weights)
    written = resumed.model_path.read_bytes()

    finished = train_variant(params, "fcn32s", 3, resume_from=keep_checkpoint_and_train_another())
    assert finished.resumed_from == 3 and finished.model_path.read_bytes() == written
    again = train_variant(params, "fcn32s", 3)  # the net's own checkpoint is this run's now
    assert again.resumed_from == 3 and again.model_path.read_bytes() == written


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


def test_corrupt_checkpoint_is_set_aside_and_training_starts_over(tiny_data, tmp_path):
    """A checkpoint is only a record of progress: a corrupt one is renamed with a one-line
    warning naming it, and the rerun trains afresh to exactly what a clean run gives."""
    params = tiny_params(tiny_data, tmp_path)
    train_variant(params, "fcn32s", 1)
    model_file = tmp_path / "fcn32s" / MODEL_FILE
    before = model_file.read_bytes()
    checkpoint = tmp_path / "fcn32s" / CHECKPOINT_FILE
    checkpoint.write_bytes(b"not a checkpoint")
    lines: list[str] = []
    result = train_variant(params, "fcn32s", 1, log=lines.append)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and str(checkpoint) in warnings[0], lines
    assert "\n" not in warnings[0] and "weights_only" not in warnings[0]
    assert result.resumed_from == 0
    assert (tmp_path / "fcn32s" / (CHECKPOINT_FILE + ".bad")).read_bytes() == b"not a checkpoint"
    assert_same_weights(load_model(model_file), before)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "fcn32s" / (CHECKPOINT_FILE + ".bad"))


def assert_same_weights(model, record_bytes: bytes) -> None:
    """``model``'s weights equal those of the model file whose bytes are given."""
    import io

    record = torch.load(io.BytesIO(record_bytes), weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, record["state_dict"][name]), name


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
    scheduler = build_scheduler(optimizer, params, len(loader))
    return model, criterion, optimizer, scheduler, loader


def test_reading_the_loss_every_few_steps_changes_nothing(tiny_data, tmp_path):
    """CUDA reads the loss back every LOSS_CHECK_STEPS steps (one synchronisation, not
    one per step): the epoch's loss and the trained weights are those of a read per step."""
    runs = []
    for every in (1, 3):
        model, criterion, optimizer, scheduler, loader = one_epoch_setup(tiny_data, tmp_path)
        assert len(loader) == 4  # a read after step 3, and the last one at the end
        stats = train_one_epoch(
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
        train_one_epoch(
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
    flipped_images, flipped_masks = random_hflip(images, masks)
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


def test_a_preloaded_training_set_trains_exactly_what_streamed_shards_train(tiny_data, tmp_path):
    """Decoding once into memory changes where the pixels come from, not the run: the
    same batches, flips and weights as PNGs decoded by a loader process every epoch."""
    streamed = train_variant(
        tiny_params(tiny_data, tmp_path / "s", preload_mb=0, workers=1, hflip=True), "fcn32s", 2
    )
    preloaded = train_variant(
        tiny_params(tiny_data, tmp_path / "p", preload_mb=64, hflip=True), "fcn32s", 2
    )
    for key in ("train_loss", "val_mean_iu", "val_pixel_acc"):
        assert [h[key] for h in streamed.history] == [h[key] for h in preloaded.history], key
    assert state_dicts_equal(model_state(streamed.model_path), model_state(preloaded.model_path))


def test_preload_holds_only_sets_under_the_limit(tiny_data):
    from fcn_pipeline.data import PreloadedDataset, SegmentationDataset, preload

    dataset = SegmentationDataset(tiny_data / "ingested", "train")
    assert dataset.decoded_bytes() == sum(4 * h * w for h, w in dataset.sizes) > 0
    assert preload(dataset, 0) is dataset
    held = preload(dataset, 1)
    assert isinstance(held, PreloadedDataset) and len(held) == len(dataset)
    for i in (0, len(dataset) - 1):
        assert torch.equal(held[i].image, dataset[i].image)
        assert torch.equal(held[i].mask, dataset[i].mask) and held[i].id == dataset[i].id


def test_bf16_cpu_training_is_repeatable_and_recorded(tiny_data, tmp_path):
    runs = [
        train_variant(tiny_params(tiny_data, tmp_path / n, precision="bf16"), "fcn32s", 1)
        for n in ("a", "b")
    ]
    assert state_dicts_equal(model_state(runs[0].model_path), model_state(runs[1].model_path))
    fp32 = train_variant(tiny_params(tiny_data, tmp_path / "f", precision="fp32"), "fcn32s", 1)
    assert not state_dicts_equal(model_state(fp32.model_path), model_state(runs[0].model_path))
    assert runs[0].runtime["precision"] == "bf16" and fp32.runtime["precision"] == "fp32"
    record = torch.load(runs[0].model_path, weights_only=True)
    assert record["runtime"]["precision"] == "bf16"
    assert record["runtime"]["threads"] == torch.get_num_threads()


def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    from fcn_pipeline import runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "native_bf16", lambda: False)
    assert runtime.training_dtype(cpu) == torch.float32
    monkeypatch.setattr(runtime, "native_bf16", lambda: True)
    assert runtime.training_dtype(cpu) == torch.bfloat16
    assert runtime.training_dtype(cpu, "fp32") == torch.float32
    assert runtime.training_dtype(torch.device("cuda")) == torch.bfloat16


def test_a_checkpoint_of_another_thread_count_is_not_resumed_and_the_log_says_why(
    tiny_data, tmp_path
):
    params = tiny_params(tiny_data, tmp_path, threads=1)

    def kill(epoch: int, metrics: dict) -> None:
        raise InterruptError

    with pytest.raises(InterruptError):
        train_variant(params, "fcn32s", 2, on_epoch_end=kill)
    lines: list[str] = []
    again = train_variant(
        tiny_params(tiny_data, tmp_path, threads=2), "fcn32s", 2, log=lines.append
    )
    assert again.resumed_from == 0
    assert any("threads 1 -> 2" in line for line in lines), lines
    # The same thread count does resume.
    with pytest.raises(InterruptError):
        train_variant(params, "fcn32s", 2, on_epoch_end=kill)
    assert train_variant(params, "fcn32s", 2).resumed_from == 1


def test_plateau_stop_keeps_the_best_epoch_in_model_pt_and_the_last_beside_it(tiny_data, tmp_path):
    # A gain of 1.0 in mean IU is never made: the run stops once `patience` epochs pass.
    params = tiny_params(tiny_data, tmp_path, plateau_patience=2, plateau_min_gain=1.0)
    result = train_variant(params, "fcn32s", 6)
    assert result.stopped_on_plateau and result.epochs == 3 and len(result.history) == 3
    curve = [h["val_mean_iu"] for h in result.history]
    assert result.best_epoch == 1 + curve.index(max(curve))
    best, last = (
        torch.load(p, weights_only=True)
        for p in (result.model_path, result.model_path.with_name(LAST_MODEL_FILE))
    )
    assert best["epoch"] == result.best_epoch and last["epoch"] == 3
    assert best["best_epoch"] == result.best_epoch and best["stopped_on_plateau"] is True
    checkpoint = torch.load(tmp_path / "fcn32s" / CHECKPOINT_FILE, weights_only=True)
    assert state_dicts_equal(last["state_dict"], checkpoint["model"])
    assert state_dicts_equal(best["state_dict"], checkpoint["best_model"])
    assert result.summary["best_val_mean_iu"] == max(curve)
    # Rerun: a finished run is restored, says so, and trains nothing more.
    lines: list[str] = []
    again = train_variant(params, "fcn32s", 6, log=lines.append)
    assert again.resumed_from == 3 and again.epochs == 3 and again.stopped_on_plateau
    assert any("holds a finished run" in line for line in lines), lines


def test_best_epoch_is_the_model_and_the_next_variant_starts_from_it(tiny_data, tmp_path):
    params = tiny_params(tiny_data, tmp_path, lr=0.05)  # an lr that makes the curve wander
    result = train_variant(params, "fcn32s", 4)
    best = torch.load(result.model_path, weights_only=True)
    curve = [h["val_mean_iu"] for h in result.history]
    assert best["epoch"] == 1 + curve.index(max(curve))
    fcn16s = train_variant(params, "fcn16s", 0)  # 0 epochs: its initialisation
    init = model_state(fcn16s.model_path)
    assert torch.equal(init["score_fr.weight"], best["state_dict"]["score_fr.weight"])


@pytest.mark.parametrize(
    ("curve", "patience", "gain", "expected"),
    [
        ([0.1, 0.2, 0.3], 2, 0.01, False),
        ([0.3, 0.305, 0.309], 2, 0.01, True),
        ([0.3, 0.305, 0.311], 2, 0.01, False),
        ([0.5, 0.4, 0.45], 2, 0.0, True),
        ([0.1, 0.1], 0, 0.0, False),
        ([0.1], 1, 0.0, False),
    ],
)
def test_plateau_rule(curve, patience, gain, expected):
    assert convergence.plateau_reached(curve, patience, gain) is expected


@pytest.mark.parametrize(
    ("curve", "patience", "drops", "expected"),
    [
        ([0.1, 0.2, 0.3, 0.4], 2, 2, (0, False)),  # rising: no plateau
        ([0.3, 0.3, 0.3], 2, 0, (0, True)),  # no drops allowed: the first plateau stops
        ([0.3, 0.3, 0.3], 2, 2, (1, False)),  # first plateau: a drop
        ([0.3, 0.3, 0.3, 0.3], 2, 2, (1, False)),  # one epoch at the new lr is too few
        ([0.3, 0.3, 0.3, 0.3, 0.3], 2, 2, (2, False)),  # patience epochs since the drop
        ([0.3, 0.3, 0.3, 0.5, 0.6, 0.7], 2, 2, (1, False)),  # the drop paid: rising again
        ([0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3], 2, 2, (2, True)),  # third plateau stops
    ],
)
def test_plateau_phases(curve, patience, drops, expected):
    params = TrainParams(
        schedule="plateau" if drops else "poly", plateau_patience=patience,
        plateau_min_gain=0.01, plateau_drops=drops,
    )  # fmt: skip
    assert convergence.plateau_phases(curve, params) == expected


def test_the_plateau_schedule_ends_only_once_the_curve_is_flat():
    """After the last drop a plateau ends the stage only when the fifths rule (the
    studies' convergence test) also holds: a curve that rose until just before the
    plateau trains on."""
    params = TrainParams(schedule="plateau", plateau_patience=2, plateau_min_gain=0.01,
                         plateau_drops=0)  # fmt: skip
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.75, 0.75]
    assert convergence.plateau_reached(rising, 2, 0.01)
    assert not convergence.converged(rising)  # last fifth 0.75, the one before 0.725
    assert convergence.plateau_phases(rising, params) == (0, False)
    assert convergence.plateau_phases([*rising, 0.75, 0.75], params) == (0, True)
    poly = TrainParams(plateau_patience=2, plateau_min_gain=0.01)  # the plain stop
    assert convergence.plateau_phases(rising, poly) == (0, True)


def test_the_plateau_schedule_needs_a_patience():
    with pytest.raises(ValueError, match=r"train\.plateau_patience > 0"):
        TrainParams(schedule="plateau")


def test_the_plateau_schedule_divides_the_lr_at_each_plateau_then_stops(tiny_data, tmp_path):
    # No epoch can gain 1.0: every epoch after the first ends a plateau of one epoch.
    changes = {"schedule": "plateau", "lr": 0.01, "plateau_patience": 1,
               "plateau_min_gain": 1.0, "plateau_drops": 2, "plateau_factor": 0.1}  # fmt: skip
    params = tiny_params(tiny_data, tmp_path / "a", **changes)
    result = train_variant(params, "fcn32s", 6)
    assert result.epochs == 4 and result.stopped_on_plateau
    # `lr` is each epoch's last step's: drops after epochs 2 and 3, the stop after 4.
    rates = [metrics["lr"] for metrics in result.history]
    assert rates == pytest.approx([0.01, 0.01, 0.001, 0.0001], rel=1e-6)

    # Killed after epoch 3 and resumed: the same lr and the same weights.
    resumed = tiny_params(tiny_data, tmp_path / "b", **changes)

    def kill_after_third_epoch(epoch: int, metrics: dict) -> None:
        if epoch == 3:
            raise InterruptError

    with pytest.raises(InterruptError):
        train_variant(resumed, "fcn32s", 6, on_epoch_end=kill_after_third_epoch)
    again = train_variant(resumed, "fcn32s", 6)
    assert again.resumed_from == 3 and again.epochs == 4 and again.stopped_on_plateau

    def curves(history):
        return [(m["lr"], m["train_loss"], m["val_mean_iu"]) for m in history]

    assert curves(again.history) == curves(result.history)
    assert state_dicts_equal(
        torch.load(tmp_path / "a" / "fcn32s" / "model_last.pt", weights_only=True)["state_dict"],
        torch.load(tmp_path / "b" / "fcn32s" / "model_last.pt", weights_only=True)["state_dict"],
    )


def test_the_poly_schedule_decays_the_learning_rate_of_every_step(tiny_data, tmp_path):
    params = tiny_params(tiny_data, tmp_path, lr=0.01, poly_power=0.9)
    result = train_variant(params, "fcn32s", 2)
    steps = result.history[0]["train_images"] // params.batch_size
    # `lr` is the rate of each epoch's last step: step k of 2 * steps runs at
    # lr * (1 - k / total) ** 0.9.
    for epoch, metrics in enumerate(result.history, start=1):
        expected = 0.01 * poly_factor(epoch * steps - 1, 2 * steps, 0.9)
        assert metrics["lr"] == pytest.approx(expected, rel=1e-6)
    fixed_params = tiny_params(tiny_data, tmp_path / "f", schedule="fixed", lr=0.01)
    fixed = train_variant(fixed_params, "fcn32s", 1)
    assert fixed.history[0]["lr"] == 0.01


def test_a_resumed_run_with_loss_sampling_draws_what_an_uninterrupted_one_draws(
    tiny_data, tmp_path
):
    settings = {"loss_sampling": 0.5, "hflip": True}
    reference = train_variant(tiny_params(tiny_data, tmp_path / "ref", **settings), "fcn32s", 2)
    params = tiny_params(tiny_data, tmp_path / "run", **settings)

    def kill(epoch: int, metrics: dict) -> None:
        raise InterruptError

    with pytest.raises(InterruptError):
        train_variant(params, "fcn32s", 2, on_epoch_end=kill)
    resumed = train_variant(params, "fcn32s", 2)
    assert resumed.resumed_from == 1
    assert [h["train_loss"] for h in resumed.history] == [
        h["train_loss"] for h in reference.history
    ]
    assert state_dicts_equal(model_state(resumed.model_path), model_state(reference.model_path))


def test_a_retrained_coarser_model_or_new_data_is_never_resumed_over(tiny_data, tmp_path):
    """FCN-16s's checkpoint belongs to the FCN-32s it started from and the data it read."""
    params = tiny_params(tiny_data, tmp_path)
    train_variant(params, "fcn32s", 1)
    train_variant(params, "fcn16s", 1)
    assert train_variant(params, "fcn16s", 1).resumed_from == 1  # unchanged: restored
    train_variant(tiny_params(tiny_data, tmp_path, seed=9), "fcn32s", 1)  # a new FCN-32s
    assert train_variant(params, "fcn16s", 1).resumed_from == 0

    from fcn_pipeline.data import SegmentationDataset

    datasets = [SegmentationDataset(tiny_data / "ingested", "train")]
    init = tmp_path / "fcn32s" / MODEL_FILE
    before = training.run_fingerprint(params, "fcn16s", 1, datasets, init)
    assert training.run_fingerprint(params, "fcn16s", 1, datasets, None) != before
    copy = tmp_path / "data-copy"
    import shutil

    shutil.copytree(tiny_data / "ingested", copy)
    meta = (copy / "dataset.json").read_text()
    (copy / "dataset.json").write_text(meta.replace('"images"', '"images" ', 1))
    changed = [SegmentationDataset(copy, "train")]
    assert training.run_fingerprint(params, "fcn16s", 1, changed, init) != before


_STAGED_RUN = """
import sys
from fcn_pipeline.config import TrainParams
from fcn_pipeline.training import train_variant
data, out = sys.argv[1], sys.argv[2]
params = TrainParams(data=data + "/ingested", patches=data + "/patches", stats=data + "/stats",
                     out=out, width=0.03125, batch_size=4, eval_batch_size=4, device="cpu",
                     workers=1, preload_mb=0, loss_sampling=0.5, hflip=True, seed=7)
for variant in ("fcn32s", "fcn16s", "fcn8s"):
    train_variant(params, variant, 2, log=lambda _: None)
"""


@pytest.mark.slow
def test_a_staged_fcn8s_is_bit_identical_across_two_fresh_processes_with_loader_workers(
    tiny_data, tmp_path
):
    """Two processes, each training FCN-32s -> 16s -> 8s with a loader process decoding the
    shards, flips and loss sampling: the same weights and validation scores bit for bit."""
    import subprocess
    import sys

    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", _STAGED_RUN, str(tiny_data), str(tmp_path / name)],
                       check=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    for variant in ("fcn32s", "fcn16s", "fcn8s"):
        a = torch.load(tmp_path / "a" / variant / MODEL_FILE, weights_only=True)
        b = torch.load(tmp_path / "b" / variant / MODEL_FILE, weights_only=True)
        assert state_dicts_equal(a["state_dict"], b["state_dict"]), variant
        keys = ("train_loss", "val_mean_iu", "val_pixel_acc")
        assert [[h[k] for k in keys] for h in a["history"]] == [
            [h[k] for k in keys] for h in b["history"]
        ]
