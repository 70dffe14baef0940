"""Studies without DVC: the study file's checks, large-object scoring, statistics, report."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from fcn_pipeline.convergence import converged, flat_gain
from fcn_pipeline.errors import ConfigError, PipelineError
from fcn_pipeline.evaluation import large_object_scores
from fcn_pipeline.study import (
    RunRecord,
    aggregate,
    compare,
    holm,
    load_finished,
    load_study,
    mean_std,
    report_markdown,
    restore_finished,
    save_finished,
    to_target,
    training_curve,
    tsv_column,
    welch_t_test,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
GOOD = {
    "base": ["epochs.fcn8s=1"],
    "settings": {"frozen": ["train.upsample=frozen"], "interp": ["train.upsample=interp"]},
    "seeds": [0, 1],
}


def study_file(tmp_path: Path, content: dict, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


# --- the study file -------------------------------------------------------------------


def test_extra_seeds_add_runs_to_one_setting_and_bad_ones_are_refused(tmp_path):
    study = load_study(study_file(tmp_path, {**GOOD, "extra_seeds": {"interp": [2, 5]}}), PARAMS)
    names = [run.name for run in study.runs]
    assert names == [
        "tiny-frozen-s0", "tiny-frozen-s1",
        "tiny-interp-s0", "tiny-interp-s1", "tiny-interp-s2", "tiny-interp-s5",
    ]  # fmt: skip
    assert study.runs[-1].seed == 5 and "train.seed=5" in study.runs[-1].overrides
    for extra, named in [
        ({"learned": [3]}, "extra_seeds: unknown setting 'learned'"),
        ({"interp": [1]}, r"extra_seeds.interp: \[1\]: seeds must be distinct"),
        ({"interp": [3, 3]}, r"extra_seeds.interp: \[3, 3\]"),
    ]:
        with pytest.raises(ConfigError, match=named):
            load_study(study_file(tmp_path, {**GOOD, "extra_seeds": extra}), PARAMS)


def test_a_good_study_plans_one_named_run_per_setting_and_seed(tmp_path):
    study = load_study(study_file(tmp_path, GOOD), PARAMS)
    assert study.name == "tiny"
    assert [r.name for r in study.runs] == [
        "tiny-frozen-s0", "tiny-frozen-s1", "tiny-interp-s0", "tiny-interp-s1",
    ]  # fmt: skip
    last = study.runs[-1]
    assert last.setting == {"train.upsample": "interp"} and last.seed == 1
    assert "train.seed=1" in last.overrides and "epochs.fcn8s=1" in last.overrides
    assert last.params.train.upsample == "interp" and last.params.train.seed == 1
    assert last.params.evaluate.large_object_share == 0.5
    assert last.metrics_path == "metrics/fcn8s.json"
    assert study.comparisons == [("frozen", "interp")]


@pytest.mark.parametrize("path", sorted((REPO / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_study_file_plans_its_runs(path):
    """Each studies/*.yaml passes the schema against today's params.yaml (keys, values,
    comparisons) and plans one run per setting and seed, with its seed set."""
    study = load_study(path, PARAMS)
    assert len(study.runs) == len(study.spec.settings) * len(study.spec.seeds) > 0
    assert all(
        f"{key}={run.seed}" in run.overrides for run in study.runs for key in study.spec.seed_keys
    )


def test_an_unknown_study_key_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"tiny\.yaml.*\n.*sedes: unknown key"):
        load_study(study_file(tmp_path, {**GOOD, "sedes": [3]}), PARAMS)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"base": ["train.upsampel=frozen"]}, "train.upsampel"),
        ({"settings": {"a": ["train.lr=0.1"], "b": ["nope.deep.key=1"]}}, "nope.deep.key"),
        ({"seed_keys": ["data.synthetic.sed"]}, "data.synthetic.sed"),
    ],
)
def test_a_parameter_params_yaml_does_not_have_is_refused_naming_it(tmp_path, change, key):
    with pytest.raises(ConfigError, match=rf"'{key}' is not a key of .*params\.yaml"):
        load_study(study_file(tmp_path, {**GOOD, **change}), PARAMS)


def test_a_bad_value_or_comparison_is_refused(tmp_path):
    bad_value = {**GOOD, "settings": {"x": ["train.upsample=sideways"]}}
    with pytest.raises(ConfigError, match=r"setting x, seed 0.*\n.*train\.upsample"):
        load_study(study_file(tmp_path, bad_value), PARAMS)
    with pytest.raises(ConfigError, match=r"comparisons: unknown setting\(s\) \['learned'\]"):
        load_study(study_file(tmp_path, {**GOOD, "comparisons": [["frozen", "learned"]]}), PARAMS)
    with pytest.raises(ConfigError, match="seeds"):
        load_study(study_file(tmp_path, {**GOOD, "seeds": [1, 1]}), PARAMS)


# --- large-object images ----------------------------------------------------------------


def test_large_object_scores_pick_images_dominated_by_a_non_background_class():
    names = ["background", "bus", "pole"]

    def hist(rows):
        return np.array(rows, dtype=np.int64)

    images = np.stack([
        hist([[2, 0, 0], [1, 6, 1], [0, 0, 0]]),  # bus 8 of 10 px: in; bus IU 6/(8+6-6)=0.75
        hist([[9, 0, 0], [0, 1, 0], [0, 0, 0]]),  # background dominates: out
        hist([[4, 0, 0], [0, 0, 0], [0, 1, 5]]),  # pole 6 of 10 px (>= 0.5): in; IU 5/(6+5-5)
        hist([[0, 0, 0], [0, 0, 0], [0, 0, 0]]),  # nothing labelled: out
    ])  # fmt: skip
    scores = large_object_scores(images, names, 0.5)
    assert scores["images"] == 2
    assert scores["dominant_class_iu"] == pytest.approx((0.75 + 5 / 6) / 2)
    # Summed histogram of images 0 and 2, [[6,0,0],[1,6,1],[0,1,5]]:
    # IU background 6/(6+7-6), bus 6/(8+7-6), pole 5/(6+6-5).
    assert scores["mean_iu"] == pytest.approx((6 / 7 + 6 / 9 + 5 / 7) / 3)
    assert large_object_scores(images, names, 0.9)["images"] == 0
    assert math.isnan(large_object_scores(images, names, 0.9)["mean_iu"])


# --- statistics -------------------------------------------------------------------------


def test_welch_t_test_against_a_hand_computed_case():
    # means 2 and 5, variances 1 and 1, n 3 and 3: t = -3 / sqrt(2/3), df = 4.
    result = welch_t_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert result["t"] == pytest.approx(-3.0 / math.sqrt(2.0 / 3.0))
    assert result["df"] == pytest.approx(4.0)
    # With df = 4 the two-sided p has a closed form: 1 - t / sqrt(t^2 + 4) * (1 + 2 / (t^2 + 4)).
    t2 = result["t"] ** 2
    expected = 1.0 - math.sqrt(t2 / (t2 + 4.0)) * (1.0 + 2.0 / (t2 + 4.0))
    assert result["p"] == pytest.approx(expected, rel=1e-9)
    assert 0.02 < result["p"] < 0.022
    # 95 % interval of the difference: -3 -+ t_{0.975, 4} * sqrt(2/3), t_{0.975, 4} = 2.7764.
    half = 2.776445105 * math.sqrt(2.0 / 3.0)
    assert result["ci_low"] == pytest.approx(-3.0 - half) and result["ci_high"] == pytest.approx(
        -3.0 + half
    )
    # Unequal variances and sizes: df below n_a + n_b - 2.
    uneven = welch_t_test([0.1, 0.2, 0.3, 0.4], [0.5, 0.9])
    assert 1.0 <= uneven["df"] < 4.0
    assert welch_t_test([1.0], [2.0, 3.0])["p"] is None
    # Two constant groups: no test, not p = 0.
    assert welch_t_test([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])["p"] is None


def test_holm_adjusts_a_family_step_down():
    assert holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None], nan_ok=True)
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    assert holm([]) == []


def test_mean_std_skips_missing_values_and_uses_the_sample_std():
    assert mean_std([1.0, None, 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)), 2)
    assert mean_std([0.5]) == (0.5, None, 1)
    assert mean_std([None]) == (None, None, 0)


def test_training_curve_accumulates_images_and_minutes_over_stages():
    tsv = "timestamp\tstep\tval_mean_iu\n10\t1\t0.4\n5\t0\t0.2\n"
    assert tsv_column(tsv, "val_mean_iu") == [0.2, 0.4]
    stages = [
        {"train_images": [60, 60], "images_per_second": [2.0, 1.0], "val_mean_iu": [0.1, 0.2]},
        {"train_images": [120], "images_per_second": [4.0], "val_mean_iu": [0.3]},
    ]
    curve = training_curve(stages)
    assert curve["epochs"] == [1, 2, 3]
    assert curve["images_seen"] == [60, 120, 240]
    assert curve["minutes"] == pytest.approx([0.5, 1.5, 2.0])
    assert curve["val_mean_iu"] == [0.1, 0.2, 0.3]


def test_to_target_is_the_first_epoch_at_or_above_the_target():
    curve = {"images_seen": [4, 8, 12], "minutes": [0.5, 1.0, 1.5], "val_mean_iu": [0.1, 0.3, 0.2]}
    assert to_target(curve, 0.3) == {"epochs": 2, "images": 8, "minutes": 1.0}  # >=, the first
    assert to_target(curve, 0.15) == {"epochs": 2, "images": 8, "minutes": 1.0}
    assert to_target(curve, 0.31) == {"epochs": None, "images": None, "minutes": None}


def test_time_to_target_is_aggregated_reported_and_compared_only_when_all_reached(tmp_path):
    def run(setting, seed, epochs):
        record = fake_run(setting, seed, 0.5, 0.1)
        reached = epochs is not None
        record["to_target"] = {
            "epochs": epochs,
            "images": epochs * 10 if reached else None,
            "minutes": 1.0 if reached else None,
        }
        return record

    runs = [run("fast", s, 100 + s) for s in range(3)] + [
        run("slow", s, 200 + 2 * s) for s in range(3)
    ]
    runs += [run("never", 0, None), run("never", 1, 300), run("never", 2, 310)]
    summary = aggregate(records(runs), ["fast", "slow", "never"])
    assert summary["fast"]["epochs_to_target"] == (101.0, 1.0, 3)
    assert summary["fast"]["images_to_target"] == (1010.0, 10.0, 3)
    assert summary["never"]["epochs_to_target"][2] == 2  # the run that never got there is out
    fast_slow, fast_never = compare(
        records(runs), [("fast", "slow"), ("fast", "never")], "epochs_to_target"
    )
    assert fast_slow["difference"] == pytest.approx(-101.0) and fast_slow["p"] < 0.001
    assert fast_never["p"] is None and not fast_never["exceeds_seed_spread"]

    results = {"study": "t", "dataset": "synthetic", "variant": "fcn8s",
               "target_val_mean_iu": 0.6, "runs": runs}  # fmt: skip
    report = (write_report(tmp_path / "t", results, [("fast", "slow"), ("fast", "never")])
              / "report.md").read_text()  # fmt: skip
    assert "## Time to a validation mean IU of 0.6" in report
    assert "| fast | 3/3 | 101.00 ± 1.00 | 1010 ± 10 | 1.00 ± 0.00 |" in report
    assert "| never | 2/3 | 305.00 ± 7.07 | 3050 ± 71 |" in report
    assert "| fast | slow | epochs_to_target | -101.00 |" in report
    assert (
        "| fast | never | epochs_to_target | - | - | - | - | - | - | n/a (a run never reached"
        in (report)
    )


def records(entries: list[dict]) -> list[RunRecord]:
    return [RunRecord.from_json(entry) for entry in entries]


def fake_run(setting, seed, mean_iu, pole):
    return {
        "name": f"s-{setting}-s{seed}",
        "setting": {"train.upsample": setting},
        "setting_name": setting,
        "seed": seed,
        "metrics": {
            "mean_iu": mean_iu,
            "pixel_acc": 0.9,
            "mean_acc": (0.6 if setting == "interp" else 0.5) + 0.01 * seed,
            "fw_iu": 0.8,
            "per_class_iu": {"background": 0.9, "pole": pole},
            "large_object": {"images": 3, "mean_iu": mean_iu / 2, "dominant_class_iu": 0.6},
        },
        "stage_mean_iu": {"fcn32s": mean_iu / 2 + 0.001 * seed, "fcn8s": mean_iu},
        "train_minutes": 1.0 + seed,
        "curve": {
            "epochs": [1.0, 2.0],
            "images_seen": [4, 8],
            "minutes": [0.5, 1.0 + seed],
            "val_mean_iu": [0.1, 0.2],
        },
    }


def test_aggregate_compare_and_report_files(tmp_path):
    runs = [
        fake_run("frozen", 0, 0.50, 0.1), fake_run("frozen", 1, 0.52, None),
        fake_run("frozen", 2, 0.51, 0.3), fake_run("interp", 0, 0.40, 0.2),
        fake_run("interp", 1, 0.41, 0.2), fake_run("interp", 2, 0.42, 0.2),
    ]  # fmt: skip
    summary = aggregate(records(runs), ["frozen", "interp"])
    mean, std, n = summary["frozen"]["mean_iu"]
    assert (mean, n) == (pytest.approx(0.51), 3) and std == pytest.approx(0.01)
    pole_mean, pole_std, _ = summary["frozen"]["per_class_iu"]["pole"]  # one seed has no pole
    assert (pole_mean, pole_std) == (pytest.approx(0.2), pytest.approx(math.sqrt(0.02)))
    assert summary["interp"]["train_minutes"][0] == pytest.approx(2.0)
    [comparison] = compare(records(runs), [("frozen", "interp")])
    assert comparison["difference"] == pytest.approx(0.10)
    assert comparison["exceeds_seed_spread"] and comparison["p"] < 0.001

    results = {"study": "s", "dataset": "synthetic", "variant": "fcn8s", "runs": runs}
    out = write_report(tmp_path / "reports" / "s", results, [("frozen", "interp")])
    assert json.loads((out / "results.json").read_text()) == results
    report = (out / "report.md").read_text()
    assert "| frozen | `train.upsample=frozen` | 3 | 0.5100 ± 0.0100 |" in report
    assert "Welch" in report and "| frozen | interp | mean_iu | 0.1000 |" in report
    # Pixel and mean (class-average) accuracy too: SegNet's global and class avg.
    assert "| 0.5100 ± 0.0100 | 0.9000 ± 0.0000 | 0.5100 ± 0.0100 |" in report
    assert "| frozen | interp | mean_acc | -0.1000 |" in report
    assert "| frozen | interp | pixel_acc | 0.0000 |" in report
    # Every staged net's mean IU, and the comparison repeated for the nets not scored.
    assert "| frozen | 0.2560 ± 0.0056 | 0.5100 ± 0.0100 |" in report
    assert "| frozen | interp | fcn32s mean_iu | 0.0500 |" in report
    assert "fcn8s mean_iu" not in report  # the scored variant is compared once
    pngs = ("per_class_iu.png", "val_mean_iu_vs_images.png", "val_mean_iu_vs_minutes.png")
    for png in (*pngs, "val_mean_iu_vs_epochs.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_the_study_deployment_runs_the_study_flow_as_fcn_pipeline_study():
    from flows.pipeline import study_flow

    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    [study] = [d for d in deployments if d["name"] == "study"]
    assert study["entrypoint"] == "flows/pipeline.py:study_flow"
    assert f"{study_flow.name}/{study['name']}" == "fcn-pipeline/study"


def test_a_study_refuses_to_start_over_staged_changes_and_names_them(tmp_path):
    import subprocess

    from fcn_pipeline.errors import PipelineError
    from flows.study_driver import check_index

    repo, outside = tmp_path / "repo", tmp_path / "outside"
    repo.mkdir(), outside.mkdir()

    def git(*args):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)

    git("init", "-q")
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    check_index(str(repo))  # untracked files are no obstacle
    git("add", "dvc.lock")  # as a killed `dvc exp run` leaves it
    with pytest.raises(PipelineError, match=r"staged changes \(dvc\.lock\).*git reset"):
        check_index(str(repo))
    git("reset", "-q")
    check_index(str(repo))
    # One error type for every failed dvc or git call: the command, where, its last words.
    with pytest.raises(PipelineError, match=r"`git rev-parse --is-inside-work-tree` in .*outside "
                       r"exited with \d+: fatal: not a git repository"):  # fmt: skip
        check_index(str(outside))


@pytest.mark.parametrize(
    ("cores", "jobs", "runs", "threads"),
    [(2, 2, 40, "1"), (2, 2, 1, "2"), (16, 4, 9, "4"), (16, 4, 2, "8"), (2, 4, 9, "1")],
)
def test_lanes_share_the_cores_by_the_studys_size_not_the_runs_left(
    monkeypatch, cores, jobs, runs, threads
):
    """A one-run study's lane gets every core; a study of many runs resumed with one left
    keeps the threads its runs started with (the count is in the checkpoint's fingerprint)."""
    from flows.study_driver import lane_env

    monkeypatch.setattr("os.cpu_count", lambda: cores)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert lane_env(jobs, runs) == {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # set by the user: kept
    assert lane_env(jobs, runs)["OMP_NUM_THREADS"] == "3"


@pytest.mark.parametrize(
    ("curve", "gain", "flat"),
    [
        ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], 0.2, False),  # fifths of 2
        ([0.5] * 8 + [0.505, 0.508], 0.0065, True),
        ([0.1, 0.5, 0.6, 0.6, 0.605], 0.005, True),  # a fifth of 5 epochs is 1
        ([0.1, 0.5, 0.6, 0.6, 0.62], 0.02, False),
        ([0.4], None, False),  # one epoch: no fifth before the last
    ],
)
def test_converged_by_the_fifths_rule(curve, gain, flat):
    assert (flat_gain(curve) is None) if gain is None else flat_gain(curve) == pytest.approx(gain)
    assert converged(curve) is flat


def test_report_counts_converged_runs_and_marks_comparisons_with_unconverged_ones(tmp_path):
    runs = [fake_run("frozen", s, 0.5 + 0.01 * s, 0.1) for s in range(3)]
    runs += [fake_run("interp", s, 0.4 + 0.01 * s, 0.2) for s in range(3)]
    for run in runs:  # frozen flat, interp still rising
        run["converged"] = run["setting_name"] == "frozen"
        run["epochs_run"] = 10
    summary = aggregate(records(runs), ["frozen", "interp"])
    assert summary["frozen"]["converged"] == 3 and summary["interp"]["converged"] == 0
    [row] = compare(records(runs), [("frozen", "interp")])
    assert row["unconverged_runs"] == 3
    flat_only = [r for r in runs if r["setting_name"] == "frozen"]
    flat_only += [dict(r, setting_name="other", converged=True) for r in flat_only]
    assert compare(records(flat_only), [("frozen", "other")])[0]["unconverged_runs"] == 0
    results = {"study": "c", "dataset": "synthetic", "variant": "fcn8s", "runs": runs}
    report = write_report(tmp_path / "c", results, [("frozen", "interp")]) / "report.md"
    text = report.read_text()
    assert "| 10.0 ± 0.0 | 3/3 |" in text and "| 10.0 ± 0.0 | 0/3 |" in text
    assert "(*unconverged*: 3 runs)" in text and "last fifth" in text


def test_a_staged_run_is_judged_on_its_scored_nets_own_epochs():
    """FCN-32s and FCN-16s only initialise FCN-8s: a run whose FCN-8s curve is flat has
    converged, though windows over all its epochs would reach back into a rising part."""
    from fcn_pipeline.study.records import scored_curve

    def stage(values):
        return {"train_images": [8.0] * len(values), "images_per_second": [1.0] * len(values),
                "val_mean_iu": values}  # fmt: skip

    fcn8s = [0.5, 0.6, 0.7, 0.79, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]
    curve = training_curve([stage([0.1] * 10), stage([0.3] * 10), stage(fcn8s)])
    assert curve["stage_epochs"] == [10, 10, 10]
    assert scored_curve(curve) == fcn8s
    assert converged(scored_curve(curve)) and flat_gain(scored_curve(curve)) == 0.0
    # All 30 epochs: windows of 6 reach back before FCN-8s's plateau (0.8 against 0.665).
    assert not converged(curve["val_mean_iu"])
    assert scored_curve({"val_mean_iu": [0.1, 0.2]}) == [0.1, 0.2]  # no stage_epochs


def test_a_run_record_reads_back_what_it_writes_and_older_entries():
    """results.json entries are RunRecord.to_json(); from_json reads them back equal,
    and reads an entry written before epochs_run/converged/to_target existed."""
    record = RunRecord.from_json(fake_run("frozen", 1, 0.5, 0.2))
    assert RunRecord.from_json(record.to_json()) == record
    assert record.metrics.large_object.mean_iu == 0.25 and record.seed == 1
    assert record.converged is None and record.to_target is None
    assert "to_target" not in record.to_json()  # a study without a target has none
    assert list(record.to_json())[-1] == "curve"


def test_a_finished_runs_record_is_kept_and_read_back_only_for_the_same_overrides(tmp_path):
    """A study resumes from these files where its DVC experiments are gone; a record of
    other overrides (the study file changed) is not reused, a broken one is named."""
    run = load_study(study_file(tmp_path, GOOD), PARAMS).runs[1]
    entry = {**fake_run("frozen", 1, 0.5, 0.2), "name": run.name}
    record = RunRecord.from_json(entry)
    kept = tmp_path / "tiny.runs"
    assert load_finished(kept, run) is None
    path = save_finished(kept, run, record, "abc123")
    assert path == kept / f"{run.name}.json" and json.loads(path.read_text())["commit"] == "abc123"
    assert load_finished(kept, run) == dataclasses.replace(
        record, overrides=run.overrides, commit="abc123"
    )  # what it ran with, for results.json
    changed = load_study(study_file(tmp_path, {**GOOD, "base": ["epochs.fcn8s=2"]}), PARAMS)
    assert changed.runs[1].name == run.name and load_finished(kept, changed.runs[1]) is None
    path.write_text('{"overrides": []')
    with pytest.raises(PipelineError, match=f"{path}: not a finished run's record"):
        load_finished(kept, run)


def test_a_reports_records_are_restored_only_for_the_same_overrides(tmp_path):
    """Seeds added to a study after its report: the report's results.json gives back the
    records of the runs it holds with the same overrides (also where the experiments
    are gone), so only the new runs train; a run whose overrides changed is not
    restored, and a broken results.json is named."""
    runs = load_study(study_file(tmp_path, GOOD), PARAMS).runs
    kept = tmp_path / "tiny.runs"
    for run in runs[:3]:
        entry = {**fake_run("frozen", run.seed, 0.5, 0.2), "name": run.name}
        save_finished(kept, run, RunRecord.from_json(entry), f"commit-{run.seed}")
    entries = [load_finished(kept, run).to_json() for run in runs[:3]]
    assert entries[0]["overrides"] == runs[0].overrides and entries[0]["commit"] == "commit-0"
    assert RunRecord.from_json(entries[1]) == load_finished(kept, runs[1])
    kept_file = json.loads((kept / f"{runs[0].name}.json").read_text())
    assert "overrides" not in kept_file["record"]  # the kept file holds them once
    results = tmp_path / "reports" / "tiny" / "results.json"
    results.parent.mkdir(parents=True)
    entries[2]["overrides"] = [*runs[2].overrides[:-1], "train.seed=99"]  # ran otherwise
    results.write_text(json.dumps(_results(entries)))
    restored_dir = tmp_path / "fresh.runs"
    restored = restore_finished(restored_dir, results, runs)
    assert restored == [runs[0].name, runs[1].name]
    assert load_finished(restored_dir, runs[0]) == load_finished(kept, runs[0])
    assert load_finished(restored_dir, runs[2]) is None
    assert restore_finished(restored_dir, results, runs) == []  # already kept
    assert restore_finished(restored_dir, tmp_path / "none.json", runs) == []
    results.write_text('{"runs": [{"seed": 1}]}')
    with pytest.raises(PipelineError, match=f"{results}: not a study's results.json"):
        restore_finished(tmp_path / "other.runs", results, runs)


def test_the_report_names_the_machines_the_runs_trained_on(tmp_path):
    entries = [fake_run("frozen", seed, 0.5, 0.2) for seed in (0, 1)]
    entries += [fake_run("interp", seed, 0.6, 0.3) for seed in (0, 1)]
    plain = report_markdown(_results(entries), *_summaries(entries))
    assert "trained on" not in plain  # records made before machines were recorded
    for entry, machine in zip(entries, ["cpu A", "cpu A", "cpu A", "cpu B"], strict=True):
        entry["machine"] = machine
    assert RunRecord.from_json(entries[3]).to_json()["machine"] == "cpu B"
    named = report_markdown(_results(entries), *_summaries(entries))
    assert (
        "- trained on: cpu A: 3 runs; cpu B: 1 run (train minutes compare only within one "
        "machine)" in named
    )


def _results(entries: list[dict]) -> dict:
    return {"study": "s", "dataset": "synthetic", "variant": "fcn8s", "runs": entries}


def _summaries(entries: list[dict]) -> tuple:
    runs = records(entries)
    return aggregate(runs, ["frozen", "interp"]), compare(runs, [("frozen", "interp")]), []


@pytest.mark.parametrize("study_file", ["upsample", "whole_vs_patch", "camvid", "camvid_patience5"])
def test_a_committed_report_regenerates_byte_identical(tmp_path, study_file):
    """A study's committed report, reports/<its study name>/, written again from its
    results.json and the study file's comparisons: the same results.json and report.md,
    byte for byte."""
    study = load_study(REPO / "studies" / f"{study_file}.yaml", PARAMS)
    committed = REPO / "reports" / study.name
    results = json.loads((committed / "results.json").read_text())
    out = write_report(tmp_path / "again", results, study.comparisons)
    for name in ("results.json", "report.md"):
        assert (out / name).read_bytes() == (committed / name).read_bytes(), name
