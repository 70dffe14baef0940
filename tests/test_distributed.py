"""Data-parallel training on the CPU (gloo): samplers, exact distributed validation,
2-process and 2-"node" trainings through the CLI, and a rank that dies."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

import fcn_pipeline.training as training
from fcn_pipeline.checkpoints import CHECKPOINT_FILE, LAST_MODEL_FILE, MODEL_FILE
from fcn_pipeline.config import TrainParams
from fcn_pipeline.data import SegmentationDataset, eval_loader, train_loader
from fcn_pipeline.distributed import process_group
from fcn_pipeline.epoch import evaluate
from fcn_pipeline.evaluation import predict_and_count
from fcn_pipeline.models import build_fcn
from fcn_pipeline.training import train_variant
from tests.conftest import REPO, free_port, perturb_weights, predicted_classes, project_env

# --- samplers (no processes) --------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_share_exactly_the_one_process_global_batches(tiny_data, world_size):
    train_set = SegmentationDataset(tiny_data / "ingested", "train")
    single = [b.ids for b in train_loader(train_set, 4, seed=11, drop_last=True)]
    ranks = [
        [b.ids for b in train_loader(train_set, 4, seed=11, rank=r, world_size=world_size)]
        for r in range(world_size)
    ]
    assert all(len(r) == len(single) for r in ranks)
    for step, batch in enumerate(single):
        shares = [ids for r in ranks for ids in r[step]]
        assert len(shares) == 4 and sorted(shares) == sorted(batch)
    other_epoch = [b.ids for b in train_loader(train_set, 4, seed=12, rank=0, world_size=2)]
    assert other_epoch != ranks[0] or world_size != 2  # reseeded per epoch


def test_validation_shares_cover_every_image_once(tiny_data):
    val_set = SegmentationDataset(tiny_data / "ingested", "val")
    shares = [
        [i for batch in eval_loader(val_set, 3, rank=r, world_size=2).batch_sampler for i in batch]
        for r in range(2)
    ]
    assert sorted(shares[0] + shares[1]) == list(range(len(val_set)))
    assert shares[0] and shares[1]


def test_global_batch_must_split_over_the_processes():
    with pytest.raises(ValueError, match=r"train\.batch_size \(3\) is the global batch"):
        TrainParams(batch_size=3, nproc_per_node=2)
    with pytest.raises(ValueError, match="nnodes = 4 processes"):
        TrainParams(batch_size=6, nproc_per_node=2, nnodes=2)


# --- distributed validation: exact -------------------------------------------------


def _tiny_net(num_classes: int) -> torch.nn.Module:
    """A net whose predictions vary over the image (a fresh FCN's zero score layer would
    predict class 0 everywhere, and a wrong sum over ranks could still look right)."""
    torch.manual_seed(5)
    return perturb_weights(build_fcn("fcn32s", num_classes, width=0.03125).eval(), 0.2)


def _rank_confusion(rank: int, port: int, data: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    val_set = SegmentationDataset(data, "val")
    cpu = torch.device("cpu")
    with process_group(cpu, timeout_s=60) as world:
        loader = eval_loader(val_set, 3, rank=world.rank, world_size=world.size)
        hist = evaluate(_tiny_net(len(val_set.meta.class_names)), loader, 6, cpu)
        torch.save(hist, Path(out) / f"hist{rank}.pt")


@pytest.mark.slow  # two processes (torchrun or mp.spawn): 7-30 s each
def test_distributed_confusion_equals_the_one_process_one_exactly(tiny_data, tmp_path):
    data = str(tiny_data / "ingested")
    mp.spawn(_rank_confusion, args=(free_port(), data, str(tmp_path)), nprocs=2)
    val_set = SegmentationDataset(data, "val")
    single = evaluate(_tiny_net(6), eval_loader(val_set, 3), 6, torch.device("cpu"))
    hists = [torch.load(tmp_path / f"hist{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(hists[0], hists[1])  # every rank holds the sum
    assert torch.equal(hists[0], single)
    assert int(single.sum()) == len(val_set) * 48 * 64  # each pixel counted once
    assert predicted_classes(single) >= 3  # predictions vary


def _rank_test_scoring(rank: int, port: int, data: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    test_set = SegmentationDataset(data, "test")
    cpu = torch.device("cpu")
    with process_group(cpu, timeout_s=60):
        hist, kept = predict_and_count(
            _tiny_net(6), test_set, batch_size=1, device=cpu, keep={0, 3}
        )
        kept = {index: torch.from_numpy(pred) for index, pred in kept.items()}
        torch.save({"hist": hist, "kept": kept}, Path(out) / f"test{rank}.pt")


@pytest.mark.slow  # two processes (torchrun or mp.spawn): 7-30 s each
def test_distributed_test_scoring_equals_the_one_process_one_exactly(tiny_data, tmp_path):
    data = str(tiny_data / "ingested")
    mp.spawn(_rank_test_scoring, args=(free_port(), data, str(tmp_path)), nprocs=2)
    cpu = torch.device("cpu")
    test_set = SegmentationDataset(data, "test")
    hist, kept = predict_and_count(_tiny_net(6), test_set, batch_size=1, device=cpu, keep={0, 3})
    assert predicted_classes(hist) >= 3 and len({int(v) for v in kept[0].ravel()}) >= 2
    for rank in range(2):
        got = torch.load(tmp_path / f"test{rank}.pt", weights_only=True)
        assert torch.equal(got["hist"], hist)
        assert sorted(got["kept"]) == [0, 3]  # rank 1 predicted image 3 (batches 1, 3)
        assert all((got["kept"][i].numpy() == kept[i]).all() for i in (0, 3))


# --- whole trainings through the CLI (torchrun, gloo) -----------------------------


def write_params(tiny_data: Path, tmp_path: Path, name: str, **train) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for group, directory in (("data", "ingested"), ("stats", "stats"), ("patches", "patches")):
        params[group]["out"] = str(tiny_data / directory)
    params["train"].update(
        out=str(tmp_path / name / "models"),
        live=str(tmp_path / name / "dvclive"),
        width=0.03125,
        batch_size=4,
        eval_batch_size=3,
        device="cpu",
        workers=0,
        threads=1,
        dist_timeout_s=60,
        norm="none",
        hflip=False,
        **train,
    )  # fmt: skip  (no BatchNorm, no flips: both draw or normalise per rank)
    params["epochs"]["fcn32s"] = 1
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run_train(params: Path, env: dict[str, str], timeout: float = 240) -> subprocess.Popen:
    command = [sys.executable, "-m", "flows.cli", "--params", str(params)]
    return subprocess.Popen(
        [*command, "train", "--variant", "fcn32s"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


@pytest.fixture
def env() -> dict[str, str]:
    env = project_env()
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    return env


def history(path: Path) -> dict[str, float]:
    return torch.load(path, weights_only=True)["history"][-1]


@pytest.mark.slow  # two processes (torchrun or mp.spawn): 7-30 s each
def test_two_processes_train_like_one_with_the_same_global_batch(tiny_data, tmp_path, env):
    one = write_params(tiny_data, tmp_path, "one")
    two = write_params(tiny_data, tmp_path, "two", nproc_per_node=2)
    status, output = finish(run_train(two, env))
    assert status == 0, output
    assert "world size 2" in output
    status, single_output = finish(run_train(one, env))
    assert status == 0, single_output
    assert "world size 1" in single_output

    models = sorted((tmp_path / "two").rglob("*.pt"))
    # rank 0 alone wrote
    assert [p.name for p in models] == ["checkpoint.pt", MODEL_FILE, LAST_MODEL_FILE]
    assert (tmp_path / "two" / "dvclive" / "fcn32s" / "metrics.json").is_file()
    a, b = history(tmp_path / "one/models/fcn32s" / MODEL_FILE), history(models[1])
    print({k: (a[k], b[k]) for k in ("train_loss", "val_mean_iu", "val_pixel_acc")})
    assert a["train_images"] == b["train_images"] == 8
    # Same images per step, gradients averaged over 2 halves instead of 1 whole: only the
    # float32 summation order differs (see the README for the measured gap).
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    for key in ("val_mean_iu", "val_pixel_acc"):
        assert b[key] == pytest.approx(a[key], abs=1e-3)


@pytest.mark.slow  # two processes (torchrun or mp.spawn): 7-30 s each
def test_two_nodes_on_one_machine_meet_at_a_c10d_rendezvous(tiny_data, tmp_path, env):
    port = free_port()
    params = write_params(
        tiny_data, tmp_path, "nodes", nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}",
        rdzv_id=f"test-{port}",
    )  # fmt: skip
    nodes = [run_train(params, env) for _ in range(2)]
    results = [finish(node) for node in nodes]
    for status, output in results:
        assert status == 0, output
    assert any("world size 2" in output for _, output in results)
    assert (tmp_path / "nodes" / "models" / "fcn32s" / MODEL_FILE).is_file()


@pytest.mark.slow  # two processes (torchrun or mp.spawn): 7-30 s each
def test_a_rank_that_dies_fails_the_stage_with_an_error_not_a_hang(tiny_data, tmp_path, env):
    params = write_params(tiny_data, tmp_path, "killed", nproc_per_node=2)
    env["FCN_TEST_KILL_RANK"] = "1"  # tests/faults/sitecustomize.py: rank 1 dies
    env["PYTHONPATH"] = f"{REPO / 'tests' / 'faults'}{os.pathsep}{env['PYTHONPATH']}"
    start = time.monotonic()
    status, output = finish(run_train(params, env), timeout=200)
    assert status == 1, output
    assert "fcn-pipeline train: error: distributed training failed" in output
    elapsed = time.monotonic() - start
    print(f"killed rank: exit {status} after {elapsed:.1f} s\n{output[-1500:]}")
    assert elapsed < 200
    assert not (tmp_path / "killed" / "models" / "fcn32s" / MODEL_FILE).exists()


# --- resume under DDP ---------------------------------------------------------------


def _tiny_train_params(tiny_data: Path, out: Path) -> TrainParams:
    return TrainParams(
        data=str(tiny_data / "ingested"), patches=str(tiny_data / "patches"),
        stats=str(tiny_data / "stats"), out=str(out), width=0.03125, batch_size=4,
        eval_batch_size=3, device="cpu", workers=0, threads=1, seed=3, dist_timeout_s=60,
        norm="none", hflip=False,
    )  # fmt: skip


def _rank_resume(rank: int, port: int, tiny_data: Path, out: Path, stop: bool) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    if stop:  # every rank stops after epoch 1 is saved, like an interrupted run
        line = training.epoch_line

        def stop_after_first(net: str, epoch: int, epochs: int, metrics: dict) -> str:
            if epoch == 1:
                raise InterruptError
            return line(net, epoch, epochs, metrics)

        training.epoch_line = stop_after_first
    try:
        result = train_variant(_tiny_train_params(tiny_data, out), "fcn32s", 2)
    except InterruptError:
        return
    torch.save({"resumed_from": result.resumed_from, "history": result.history}, out / f"r{rank}")


class InterruptError(Exception):
    pass


@pytest.mark.slow  # two processes (torchrun or mp.spawn): 7-30 s each
def test_two_processes_resume_their_checkpoint(tiny_data, tmp_path):
    reference, out = tmp_path / "ref", tmp_path / "run"
    mp.spawn(_rank_resume, args=(free_port(), tiny_data, reference, False), nprocs=2)
    mp.spawn(_rank_resume, args=(free_port(), tiny_data, out, True), nprocs=2)
    assert (out / "fcn32s" / CHECKPOINT_FILE).is_file()
    assert not (out / "fcn32s" / MODEL_FILE).exists()
    mp.spawn(_rank_resume, args=(free_port(), tiny_data, out, False), nprocs=2)
    ranks = [torch.load(out / f"r{r}", weights_only=True) for r in range(2)]
    assert [r["resumed_from"] for r in ranks] == [1, 1]  # rank 1 got rank 0's checkpoint
    expected = torch.load(reference / "r0", weights_only=True)["history"]
    for key in ("train_loss", "val_mean_iu", "val_pixel_acc"):
        assert [h[key] for h in ranks[0]["history"]] == [h[key] for h in expected]
    assert (out / "fcn32s" / MODEL_FILE).is_file()


@pytest.mark.slow  # two processes (torchrun or mp.spawn): 7-30 s each
def test_a_one_process_checkpoint_is_not_resumed_by_two(tiny_data, tmp_path):
    train_variant(_tiny_train_params(tiny_data, tmp_path), "fcn32s", 2)
    mp.spawn(_rank_resume, args=(free_port(), tiny_data, tmp_path, False), nprocs=2)
    assert torch.load(tmp_path / "r0", weights_only=True)["resumed_from"] == 0


# --- through DVC ----------------------------------------------------------------------


@pytest.mark.slow
def test_dvc_exp_run_with_two_processes_matches_dvc_repro(project_copy, env):
    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["dvc", *args], cwd=project_copy, env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip

    params = yaml.safe_load((project_copy / "params.yaml").read_text())
    splits = {"train": 8, "val": 3, "test": 2}
    params["data"]["synthetic"].update(height=48, width=64, splits=splits)
    params["data"]["workers"] = params["stats"]["workers"] = params["patches"]["workers"] = 1
    params["train"].update(
        width=0.03125,
        batch_size=4,
        eval_batch_size=2,
        workers=0,
        threads=1,
        device="cpu",
        norm="none",
        hflip=False,
    )
    params["epochs"]["fcn32s"] = 1
    (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run = dvc("repro", "train@fcn32s")
    assert run.returncode == 0, run.stdout + run.stderr
    live = project_copy / "dvclive" / "fcn32s" / "metrics.json"
    single = yaml.safe_load(live.read_text())
    subprocess.run(["git", "add", "-A"], cwd=project_copy, check=True)
    subprocess.run(["git", "commit", "-qm", "one process"], cwd=project_copy, check=True)

    run = dvc("exp", "run", "train@fcn32s", "-S", "train.nproc_per_node=2")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "world size 2" in run.stdout + run.stderr
    assert "another configuration; starting over" in run.stdout + run.stderr
    double = yaml.safe_load(live.read_text())
    assert double["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)
    assert double["val_mean_iu"] == pytest.approx(single["val_mean_iu"], abs=1e-3)
    assert double["val_pixel_acc"] == pytest.approx(single["val_pixel_acc"], abs=1e-3)
    print("dvc repro", single, "\ndvc exp run -S train.nproc_per_node=2", double)
