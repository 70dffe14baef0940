"""`fcn-pipeline study` end to end: real DVC experiments in a temporary git copy."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import conftest
from tests.conftest import project_env

RUNS = ["tiny-frozen-s0", "tiny-frozen-s1", "tiny-interp-s0", "tiny-interp-s1"]
METRIC_KEYS = {"mean_iu", "pixel_acc", "mean_acc", "fw_iu", "per_class_iu", "large_object"}


def tiny_project(project: Path) -> None:
    """The copy's params.yaml at the tiny size (two FCN-8s epochs), committed."""
    conftest.tiny_project(project, fcn8s_epochs=2, overlays=1)
    subprocess.run(["git", "commit", "-qam", "tiny"], cwd=project, check=True)


def study(
    project: Path, env: dict, name: str = "tiny", *options: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["fcn-pipeline", "study", f"studies/{name}.yaml", *options],
        cwd=project, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip


TINY_STUDY = {
    "base": ["epochs.fcn8s=1"],
    "settings": {"frozen": ["train.upsample=frozen"], "interp": ["train.upsample=interp"]},
    "seeds": [0, 1],
    "large_object_share": 0.4,
}


def write_study(project: Path, name: str, content: dict) -> None:
    (project / "studies").mkdir(exist_ok=True)
    (project / "studies" / f"{name}.yaml").write_text(yaml.safe_dump(content))


def exp_refs(project: Path) -> dict[str, str]:
    out = subprocess.run(
        ["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"],
        cwd=project, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    refs = (line.split() for line in out.splitlines())
    # refs/exps/<baseline sha[:2]>/<baseline sha[2:]>/<name>; not DVC's exec/stash refs.
    return {ref.split("/")[-1]: sha for sha, ref in refs if len(ref.split("/")) == 5}


@pytest.mark.slow
def test_two_settings_two_seeds_make_four_experiments_and_a_rerun_skips_them(project_copy):
    """In two lanes (``--jobs 2``); a rerun skips them all, one removed is run again
    alone, in a lane with the threads its siblings had."""
    env = project_env()
    tiny_project(project_copy)
    write_study(project_copy, "tiny", TINY_STUDY)
    params_before = (project_copy / "params.yaml").read_bytes()
    run = study(project_copy, env, "tiny", "--jobs", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    output = run.stdout + run.stderr
    assert "4 experiments, 2 at a time" in output and "'OMP_NUM_THREADS'" in output
    # Each finished experiment counts as run, none as failed (a task state read too
    # early once logged finished experiments as failed).
    assert "study tiny: ran 4, skipped 0" in output and "failed in lane" not in output
    # Each run is recorded as it finishes; the records go once results.json holds them.
    assert output.count("recorded in reports/tiny.runs/") == 4, output[-3000:]
    assert not (project_copy / "reports" / "tiny.runs").exists()
    assert lanes_beside(project_copy) == []  # every experiment is the project's now
    refs = exp_refs(project_copy)
    assert sorted(refs) == RUNS
    shown = subprocess.run(
        ["dvc", "exp", "show", "--json"], cwd=project_copy, env=env, capture_output=True, text=True
    )
    assert all(name in shown.stdout for name in RUNS), shown.stdout[-2000:]
    assert (project_copy / "params.yaml").read_bytes() == params_before

    report = project_copy / "reports" / "tiny"
    results = json.loads((report / "results.json").read_text())
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=project_copy, capture_output=True, text=True
    ).stdout.strip()
    assert results["study"] == "tiny" and results["dataset"] == "synthetic"
    assert [r["name"] for r in results["runs"]] == RUNS
    for entry, (upsample, seed) in zip(
        results["runs"], [("frozen", 0), ("frozen", 1), ("interp", 0), ("interp", 1)], strict=True
    ):
        assert entry["setting"] == {"train.upsample": upsample} and entry["seed"] == seed
        assert {f"train.upsample={upsample}", f"train.seed={seed}"} <= set(entry["overrides"])
        assert entry["commit"] == head
        assert set(entry["metrics"]) == METRIC_KEYS
        assert 0.0 <= entry["metrics"]["mean_iu"] <= 1.0
        assert set(entry["metrics"]["per_class_iu"]) >= {"background", "pole"}
        large = entry["metrics"]["large_object"]
        assert set(large) == {"images", "mean_iu", "dominant_class_iu"} and large["images"] >= 0
        assert entry["train_minutes"] > 0 and "cores" in entry["machine"]
        # Every staged net's test mean IU, read from the experiment's commit.
        stages = entry["stage_mean_iu"]
        assert list(stages) == ["fcn32s", "fcn16s", "fcn8s"]
        assert stages["fcn8s"] == entry["metrics"]["mean_iu"]
        assert all(0.0 <= value <= 1.0 for value in stages.values())
        # One epoch per stage: three validation points, images accumulate over stages.
        assert len(entry["curve"]["val_mean_iu"]) == 3
        assert entry["curve"]["images_seen"] == [4, 8, 12]
        assert entry["curve"]["epochs"] == [1, 2, 3]
    # The seeds really differ: not every frozen run scores the same.
    frozen = [r["metrics"]["pixel_acc"] for r in results["runs"][:2]]
    assert frozen[0] != frozen[1]
    markdown = (report / "report.md").read_text()
    assert "| frozen |" in markdown and "| frozen | interp | mean_iu |" in markdown
    assert "| frozen | interp | fcn32s mean_iu |" in markdown
    assert {p.name for p in report.glob("*.png")} == {
        "per_class_iu.png", "val_mean_iu_vs_images.png", "val_mean_iu_vs_minutes.png",
        "val_mean_iu_vs_epochs.png",
    }  # fmt: skip

    # The models of a lane's experiment are in the project's DVC cache: it applies here.
    applied = subprocess.run(
        ["dvc", "exp", "apply", RUNS[0]], cwd=project_copy, env=env, capture_output=True, text=True
    )
    assert applied.returncode == 0, applied.stderr
    assert (project_copy / "models" / "fcn8s" / "model.pt").stat().st_size > 0
    subprocess.run(["git", "reset", "-q", "--hard"], cwd=project_copy, check=True)

    # Resuming: every experiment exists, none runs again, the report is rewritten.
    (report / "results.json").unlink()
    again = study(project_copy, env)
    assert again.returncode == 0, again.stdout + again.stderr
    output = again.stdout + again.stderr
    assert output.count("finished, recorded in reports/tiny.runs, skipped") == 4, output[-3000:]
    assert "Running stage" not in output
    assert exp_refs(project_copy) == refs
    assert json.loads((report / "results.json").read_text()) == results

    # Interrupted before the last run, and the experiments gone (a fresh clone, another
    # machine) but the first three runs' records committed: only the last runs again.
    from fcn_pipeline.study import RunRecord, load_study, save_finished

    planned = load_study(str(project_copy / "studies/tiny.yaml"), str(project_copy / "params.yaml"))
    (report / "results.json").unlink()  # an interrupted study has not written its report
    for run, entry in zip(planned.runs[:3], results["runs"][:3], strict=True):
        save_finished(report.parent / "tiny.runs", run, RunRecord.from_json(entry), head)
    removed = subprocess.run(
        ["dvc", "exp", "remove", "--all-commits"], cwd=project_copy, env=env, capture_output=True
    )
    assert removed.returncode == 0 and exp_refs(project_copy) == {}, removed.stderr
    resumed = study(project_copy, env, "tiny", "--jobs", "2")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    output = resumed.stdout + resumed.stderr
    # The last run still goes to a lane, with the threads of a lane of this four-run study
    # (as its siblings had, and its checkpoint's fingerprint after a stop would need).
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // 2)))
    assert f"1 experiments, 1 at a time, {{'OMP_NUM_THREADS': '{threads}'" in output, output[-3000:]
    assert output.count("finished, recorded in reports/tiny.runs, skipped") == 3, output[-3000:]
    assert "study tiny: ran 1, skipped 3" in output
    assert sorted(exp_refs(project_copy)) == RUNS[-1:]
    again = json.loads((report / "results.json").read_text())
    assert again["runs"][:3] == results["runs"][:3]
    assert again["runs"][3]["name"] == RUNS[-1] and 0 <= again["runs"][3]["metrics"]["mean_iu"] <= 1

    # Seeds added after the report, in a clone without the experiments: the report's
    # results.json gives the recorded runs back (same overrides), nothing trains again.
    subprocess.run(["dvc", "exp", "remove", "--all-commits"], cwd=project_copy, env=env, check=True)
    restored = study(project_copy, env)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    output = restored.stdout + restored.stderr
    assert output.count("restored from reports/tiny/results.json") == 4, output[-3000:]
    assert "study tiny: ran 0, skipped 4" in output and "Running stage" not in output
    assert json.loads((report / "results.json").read_text()) == again


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (
            {"settings": {"a": ["train.upsample=frozen"]}, "seeds": [0], "seed": 1},
            "seed: unknown key",
        ),
        ({"settings": {"a": ["train.upsampling=frozen"]}, "seeds": [0]}, "'train.upsampling'"),
    ],
)
def test_bad_study_file_is_refused_before_any_experiment(project_copy, content, named):
    (project_copy / "studies").mkdir(exist_ok=True)
    (project_copy / "studies" / "bad.yaml").write_text(yaml.safe_dump(content))
    env = project_env("http://127.0.0.1:9/api")  # no server: nothing may reach Prefect
    lock = (project_copy / "dvc.lock").read_bytes()  # the committed reference run's
    run = study(project_copy, env, "bad")
    assert run.returncode == 1
    assert run.stderr.startswith("fcn-pipeline study: error: studies/bad.yaml"), run.stderr
    assert named in run.stderr
    assert exp_refs(project_copy) == {}
    assert (project_copy / "dvc.lock").read_bytes() == lock
    assert not (project_copy / "reports" / "bad").exists()
    changed = subprocess.run(
        ["git", "status", "--porcelain"], cwd=project_copy, capture_output=True, text=True
    ).stdout.split("\n")  # fmt: skip
    assert [line for line in changed if line and "studies/" not in line] == []


def lanes_beside(project: Path) -> list[Path]:
    return sorted(project.parent.glob(f".{project.name}.study-lane-*"))


def test_jobs_two_refuses_uncommitted_tracked_changes_before_any_lane(project_copy):
    write_study(project_copy, "tiny", TINY_STUDY)
    params = project_copy / "params.yaml"
    params.write_text(params.read_text() + "\n")  # tracked, not committed
    env = project_env("http://127.0.0.1:9/api")  # no server: nothing may reach Prefect
    run = study(project_copy, env, "tiny", "--jobs", "2")
    assert run.returncode != 0
    assert "params.yaml differ from HEAD: commit them" in run.stderr, run.stderr[-2000:]
    assert lanes_beside(project_copy) == [] and exp_refs(project_copy) == {}


def test_a_lane_left_by_a_killed_study_gives_up_its_experiments_first(project_copy):
    import logging

    from flows.study_driver import lane_paths, lanes

    def git(cwd, *args):
        return subprocess.run(
            ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
        ).stdout.strip()

    # A lane as a killed `--jobs 2` study leaves it: a clone with a finished experiment.
    [left, _] = lane_paths(str(project_copy), 2)
    git(project_copy.parent, "clone", "-q", str(project_copy), str(left))
    (left / "metrics").mkdir(exist_ok=True)
    (left / "metrics" / "fcn8s.json").write_text('{"mean_iu": 0.5}\n')
    git(left, "add", "metrics/fcn8s.json")
    git(left, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "experiment")
    head = git(project_copy, "rev-parse", "HEAD")
    ref = f"refs/exps/{head[:2]}/{head[2:]}/s-a-s0"
    git(left, "update-ref", ref, "HEAD")

    with lanes(str(project_copy), 2, logging.getLogger("test")) as made:
        assert made == [str(path) for path in lane_paths(str(project_copy), 2)]
        assert git(left, "for-each-ref", "refs/exps") == ""  # made afresh from HEAD
        assert git(left, "rev-parse", "HEAD") == head
    assert git(project_copy, "show", f"{ref}:metrics/fcn8s.json") == '{"mean_iu": 0.5}'
    assert lanes_beside(project_copy) == []


def test_a_study_fetches_a_killed_studys_lanes_before_it_lists_what_is_done(
    project_copy, monkeypatch
):
    """A killed `--jobs 2` study's finished experiments are skipped by the next run, not
    trained again: the left-over lanes are fetched before `dvc exp show` is read."""
    import logging

    from flows import study, study_driver

    def git(cwd, *args):
        return subprocess.run(
            ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
        ).stdout.strip()

    write_study(project_copy, "tiny", TINY_STUDY)
    [_, left] = study_driver.lane_paths(str(project_copy), 2)
    git(project_copy.parent, "clone", "-q", str(project_copy), str(left))
    head = git(project_copy, "rev-parse", "HEAD")
    ref = f"refs/exps/{head[:2]}/{head[2:]}/tiny-frozen-s0"
    git(left, "update-ref", ref, "HEAD")
    seen = []

    def listed(project_dir):
        seen.append(git(project_dir, "for-each-ref", "--format=%(refname)", "refs/exps"))
        raise RuntimeError("listed")

    monkeypatch.setattr(study_driver, "list_experiments", listed)
    monkeypatch.chdir(project_copy)
    with pytest.raises(RuntimeError, match="listed"):
        study.run_study(
            "studies/tiny.yaml", "params.yaml", "reports", 2, logging.getLogger("test")
        )  # fmt: skip
    assert seen == [ref]


def lane_checkpoints(project: Path, net: str) -> list[Path]:
    return [lane / "models" / net / "checkpoint.pt" for lane in lanes_beside(project)
            if (lane / "models" / net / "checkpoint.pt").is_file()]  # fmt: skip


@pytest.mark.slow
def test_runs_killed_in_their_lanes_resume_from_their_checkpoints(project_copy):
    """A `--jobs 2` study killed while its lanes train (a session ending) and run again
    resumes each run it was training from the checkpoints its lane left, and ends with
    the scores of the same run never interrupted (same params, seed and threads)."""
    import os
    import signal
    import time

    env = {**project_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    tiny_project(project_copy)
    runs = {"base": ["epochs.fcn8s=40"], "settings": {"whole": []}, "large_object_share": 0.4}
    write_study(project_copy, "killed", {**runs, "seeds": [0, 1]})
    subprocess.run(["git", "add", "studies"], cwd=project_copy, check=True)
    subprocess.run(["git", "commit", "-qm", "study"], cwd=project_copy, check=True)
    killed = subprocess.Popen(
        ["fcn-pipeline", "study", "studies/killed.yaml", "--jobs", "2"], cwd=project_copy,
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 900
    while not lane_checkpoints(project_copy, "fcn8s") and killed.poll() is None:
        assert time.monotonic() < deadline, "no FCN-8s checkpoint in a lane after 15 minutes"
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)  # the study, its `dvc exp run`s and trainings
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the study ended before it was killed"

    again = study(project_copy, env, "killed", "--jobs", "2")
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-3000:]
    kept = project_copy.parent / f".{project_copy.name}.study-resume"
    assert "fcn16s, fcn8s checkpoints of lane" in output, output[-3000:]
    resumed = sorted(
        line.split("]")[0].rsplit("-s", 1)[1]
        for line in output.splitlines()
        if f"fcn8s: resuming from {kept}/killed-whole-s" in line
    )  # the seeds of the runs that resumed their FCN-8s training
    assert resumed, output[-3000:]
    assert not kept.exists()  # dropped as each run finished

    write_study(project_copy, "fresh", {**runs, "seeds": [int(seed) for seed in resumed]})
    fresh = study(project_copy, env, "fresh")  # one job, in the workspace, uninterrupted
    assert fresh.returncode == 0, (fresh.stdout + fresh.stderr)[-3000:]
    assert "resuming" not in fresh.stdout + fresh.stderr
    scores = {}
    for name in ("killed", "fresh"):
        results = json.loads((project_copy / "reports" / name / "results.json").read_text())
        scores[name] = {
            run["seed"]: (run["metrics"], run["curve"]["val_mean_iu"]) for run in results["runs"]
        }
    for seed in resumed:
        assert scores["killed"][int(seed)] == scores["fresh"][int(seed)], seed


def test_params_left_with_a_runs_overrides_are_refused_before_any_experiment(project_copy):
    """A study killed while a run trained in the workspace leaves that run's overrides in
    params.yaml (`dvc exp run -S` writes them); the next study must not take them for
    its base. Another uncommitted edit is the user's own and is not refused."""
    from fcn_pipeline.errors import PipelineError
    from fcn_pipeline.study import load_study
    from flows.study_driver import check_params_left_over

    write_study(project_copy, "tiny", TINY_STUDY)
    params_file = project_copy / "params.yaml"
    committed = yaml.safe_load(params_file.read_text())
    left = yaml.safe_load(params_file.read_text())
    left["epochs"]["fcn8s"], left["train"]["upsample"], left["train"]["seed"] = 1, "interp", 1
    left["evaluate"]["large_object_share"] = 0.4
    params_file.write_text(yaml.safe_dump(left))
    env = project_env("http://127.0.0.1:9/api")  # no server: nothing may reach Prefect
    run = study(project_copy, env, "tiny")
    assert run.returncode != 0
    assert "params.yaml: it holds HEAD's params with the overrides of run tiny-interp-s1" in (
        run.stderr
    ), run.stderr[-2000:]
    assert "git checkout params.yaml" in run.stderr and exp_refs(project_copy) == {}

    committed["train"]["lr"] = committed["train"]["lr"] * 2  # the user's own edit
    params_file.write_text(yaml.safe_dump(committed))
    study_spec = load_study(project_copy / "studies" / "tiny.yaml", params_file)
    check_params_left_over(str(project_copy), study_spec, "params.yaml")  # no error
    params_file.write_text(yaml.safe_dump(left))
    with pytest.raises(PipelineError, match="tiny-interp-s1"):
        check_params_left_over(str(project_copy), study_spec, "params.yaml")


def test_left_over_lanes_give_up_their_runs_checkpoints_but_not_committed_ones(project_copy):
    """What :func:`set_aside_checkpoints` keeps: the checkpoints of the pending run whose
    params a lane holds (not those of a lane holding a finished or unknown run's, and
    not a checkpoint HEAD's dvc.lock records: `dvc exp run` put that one there); the
    run's environment then points at them, and they go once it finishes."""
    import hashlib
    import logging

    from fcn_pipeline.config import parse_overrides
    from fcn_pipeline.study import load_study
    from flows import study_driver
    from flows.train import RESUME_ENV

    write_study(project_copy, "tiny", TINY_STUDY)
    lock = yaml.safe_load((project_copy / "dvc.lock").read_text())
    outs = lock["stages"]["train@fcn8s"]["outs"]
    committed_out = next(out for out in outs if out["path"].endswith("checkpoint.pt"))
    committed_out["md5"] = hashlib.md5(b"committed").hexdigest()
    (project_copy / "dvc.lock").write_text(yaml.safe_dump(lock))
    subprocess.run(["git", "commit", "-qam", "lock"], cwd=project_copy, check=True)
    spec = load_study(project_copy / "studies" / "tiny.yaml", project_copy / "params.yaml")
    pending, finished = spec.runs[1:], spec.runs[0]
    base = yaml.safe_load((project_copy / "params.yaml").read_text())

    def lane(index: int, run, checkpoints: dict[str, bytes]) -> Path:
        path = study_driver.lane_paths(str(project_copy), 3)[index]
        params = yaml.safe_load(yaml.safe_dump(base))
        for key, value in parse_overrides(run.overrides).items():
            *parents, leaf = key.split(".")
            node = params
            for part in parents:
                node = node[part]
            node[leaf] = value
        path.mkdir()
        (path / "params.yaml").write_text(yaml.safe_dump(params))
        for net, content in checkpoints.items():
            (path / "models" / net).mkdir(parents=True)
            (path / "models" / net / "checkpoint.pt").write_bytes(content)
        return path

    killed = lane(0, pending[0], {"fcn32s": b"32", "fcn16s": b"16", "fcn8s": b"committed"})
    done = lane(1, finished, {"fcn32s": b"done"})
    study_driver.set_aside_checkpoints(str(project_copy), pending, logging.getLogger("test"))

    kept = study_driver.resume_dir(str(project_copy), pending[0])
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*.pt")) == [
        "fcn16s/checkpoint.pt", "fcn32s/checkpoint.pt"
    ]  # fmt: skip
    assert (kept / "fcn32s" / "checkpoint.pt").read_bytes() == b"32"
    assert (killed / "models" / "fcn8s" / "checkpoint.pt").read_bytes() == b"committed"
    assert (done / "models" / "fcn32s" / "checkpoint.pt").is_file()  # not a pending run's
    assert study_driver.resume_env(str(project_copy), pending[0]) == {RESUME_ENV: str(kept)}
    assert study_driver.resume_env(str(project_copy), pending[1]) == {}
    study_driver.drop_checkpoints(str(project_copy), pending[0])
    assert not kept.parent.exists()
