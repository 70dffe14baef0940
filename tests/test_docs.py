"""The README stays short, and every link in it and in docs/ leads somewhere."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def test_the_readme_is_at_most_300_lines_and_starts_with_the_two_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    setup = lines.index("## Set-up")
    assert setup == min(i for i, line in enumerate(lines) if line.startswith("## "))
    block = "\n".join(lines[setup : setup + 15])
    assert "bash scripts/pipeline.sh" in block and "bash scripts/test.sh" in block


def test_every_doc_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name}" in readme, page.name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve_to_files_and_headings(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target} -> {resolved}"
        if fragment and resolved.suffix == ".md":
            assert fragment in anchors(resolved), f"{page.name}: #{fragment} not a heading"


def test_the_anchor_rule_on_known_headings():
    assert anchor("Results: the default run (synthetic dataset, 2-core CPU)") == (
        "results-the-default-run-synthetic-dataset-2-core-cpu"
    )
    assert anchor("Data stages on Dask") == "data-stages-on-dask"
    assert anchor("train (`train@fcn32s` -> `train@fcn16s`)") == "train-trainfcn32s---trainfcn16s"


def test_the_default_run_table_is_the_committed_metrics():
    """The README's and docs/results.md's table of the default run is read back from the
    committed metrics/<variant>.json (3 decimals), not trusted as typed."""
    import json

    columns = ["pixel_acc", "mean_acc", "mean_iu", "fw_iu"]
    for page in (REPO / "README.md", REPO / "docs" / "results.md"):
        rows = {
            m.group(1): [float(c.strip(" *")) for c in m.group(2).split("|")]
            for m in re.finditer(r"^\| FCN-(\d+)s +\|([^\n]+)\|$", page.read_text(), re.M)
        }
        assert set(rows) == {"32", "16", "8"}, page.name
        for stride, cells in rows.items():
            metrics = json.loads((REPO / "metrics" / f"fcn{stride}s.json").read_text())
            expected = [metrics[c] for c in columns] + list(metrics["per_class_iu"].values())
            assert cells == [round(v, 3) for v in expected], (page.name, stride)


def _table_rows(section: str) -> list[list[str]]:
    """The data rows of the first markdown table in ``section``, as cells."""
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = itertools.takewhile(lambda line: line.startswith("|"), lines[start:])
    return [[c.strip() for c in line.strip("|").split("|")] for line in list(table)[2:]]


def _section(page: str, heading: str) -> str:
    text = (REPO / "docs" / page).read_text()
    return text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]


def _pm(values: list, digits: int = 3, scale: float = 1.0) -> str:
    import statistics

    values = [scale * v for v in values]
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


# Question 2's scores, the same columns in its short-budget and its converged table:
# FCN-8s mean IU, bus, triangle and pole IU, large-object mean IU and dominant-class IU,
# epochs to the validation target.
Q2_SCORES = (
    [lambda rs: _pm([r["metrics"]["mean_iu"] for r in rs])]
    + [lambda rs, c=c: _pm([r["metrics"]["per_class_iu"][c] for r in rs])
       for c in ("bus", "triangle", "pole")]
    + [lambda rs: _pm([r["metrics"]["large_object"]["mean_iu"] for r in rs]),
       lambda rs: _pm([r["metrics"]["large_object"]["dominant_class_iu"] for r in rs]),
       lambda rs: _pm([r["to_target"]["epochs"] for r in rs], 2)]
)  # fmt: skip


# CamVid's scores, in %, the same columns in its short-budget and its converged table:
# global and class-average accuracy and mean IU (mean +- std), per-class IU (means).
CAMVID_CLASSES = ("Road", "Building", "Sky", "Tree", "Car", "Pole", "SignSymbol",
                  "Pedestrian", "Bicyclist")  # fmt: skip
CAMVID_SCORES = (
    [lambda rs, k=k: _pm([r["metrics"][k] for r in rs], 1, 100.0)
     for k in ("pixel_acc", "mean_acc", "mean_iu")]
    + [lambda rs, c=c: f"{100 * sum(r['metrics']['per_class_iu'][c] for r in rs) / len(rs):.1f}"
       for c in CAMVID_CLASSES]
)  # fmt: skip


# Each study table of docs/results.md: its heading, its report, the settings of its rows in
# order, and each column's cell computed from the runs of a setting.
STUDY_TABLES = {
    "Question 1: learned, frozen or plain-interpolation upsampling?": (
        "upsample", ["frozen", "learned", "interp"],
        [lambda rs, net=net: _pm([r["stage_mean_iu"][net] for r in rs])
         for net in ("fcn32s", "fcn16s")]
        + [lambda rs: _pm([r["metrics"]["mean_iu"] for r in rs]),
           lambda rs: _pm([r["metrics"]["large_object"]["mean_iu"] for r in rs]),
           lambda rs: _pm([r["metrics"]["large_object"]["dominant_class_iu"] for r in rs]),
           lambda rs: _pm([r["metrics"]["per_class_iu"]["pole"] for r in rs])],
    ),
    "Question 2: whole images, loss weights, loss sampling or patches?": (
        "whole_vs_patch",
        ["whole", "whole_weighted", "sampled_p50", "sampled_p25", "patch_balanced",
         "patch_uniform", "patch_uniform_weighted"],
        [*Q2_SCORES, lambda rs: _pm([r["train_minutes"] for r in rs], 1)],
    ),
    "CamVid: class weights and class-balanced patches on real scenes": (
        "camvid", ["whole", "whole_weighted", "patch_balanced"], CAMVID_SCORES,
    ),
}  # fmt: skip


@pytest.mark.parametrize("heading", sorted(STUDY_TABLES))
def test_the_short_budget_study_tables_are_the_committed_reports(heading):
    """Each study table of docs/results.md is read back from its committed
    reports/<study>/results.json, cell by cell, not trusted as typed."""
    import json

    study, settings, columns = STUDY_TABLES[heading]
    results = json.loads((REPO / "reports" / study / "results.json").read_text())
    rows = _table_rows(_section("results.md", heading))
    assert len(rows) >= len(settings)
    for setting, row in zip(settings, rows, strict=False):
        runs = [r for r in results["runs"] if r["setting_name"] == setting]
        assert len(runs) >= 3, setting
        assert row[1 : 1 + len(columns)] == [column(runs) for column in columns], setting


def _epochs(runs: list[dict]) -> str:
    """The scored net's epochs of each run, seed by seed."""
    return ", ".join(str(r["curve"]["stage_epochs"][-1]) for r in runs)


def _converged(runs: list[dict]) -> str:
    return f"{sum(r['converged'] for r in runs)}/{len(runs)}"


# Each converged study's table of docs/results.md: its subsection, its report, the
# settings of its rows in order, each column's cell from the runs of a setting.
CONVERGED_TABLES = {
    "Upsampling at convergence": (
        "upsample_converged", ["frozen", "learned", "interp"],
        [lambda rs: _pm([r["metrics"]["mean_iu"] for r in rs]),
         lambda rs: _pm([r["metrics"]["pixel_acc"] for r in rs]),
         lambda rs: _pm([r["metrics"]["per_class_iu"]["pole"] for r in rs]),
         lambda rs: _pm([r["metrics"]["large_object"]["dominant_class_iu"] for r in rs]),
         _epochs, _converged],
    ),
    "Question 2 at convergence": (
        "whole_vs_patch_converged",
        ["whole", "whole_weighted", "sampled_p50", "sampled_p25", "whole_b32",
         "patch_balanced", "patch_uniform", "patch_uniform_weighted"],
        [*Q2_SCORES, _epochs, _converged],
    ),
    "CamVid at convergence": (
        "camvid_converged_p10", ["whole", "whole_weighted", "patch_balanced"],
        [*CAMVID_SCORES, _epochs, _converged],
    ),
}  # fmt: skip


@pytest.mark.parametrize("heading", sorted(CONVERGED_TABLES))
def test_the_converged_study_tables_are_the_committed_reports(heading):
    """Each "... at convergence" table of docs/results.md is read back from its
    committed reports/<study>_converged/results.json (mean +- sample std over seeds)."""
    import json

    study, settings, columns = CONVERGED_TABLES[heading]
    text = (REPO / "docs" / "results.md").read_text()
    section = text.split(f"### {heading}\n", 1)[1].split("\n## ", 1)[0]
    results = json.loads((REPO / "reports" / study / "results.json").read_text())
    rows = _table_rows(section)
    assert [row[0] for row in rows] == settings
    for setting, row in zip(settings, rows, strict=True):
        runs = [r for r in results["runs"] if r["setting_name"] == setting]
        assert len(runs) >= 3, setting
        assert row[1:] == [column(runs) for column in columns], setting


def _plain(cell: str) -> str:
    """A table cell without bold and without a trailing remark in parentheses."""
    return cell.replace("**", "").split(" (")[0].strip()


def test_the_recipe_table_is_the_committed_benchmark():
    """docs/results.md's recipe table against bench_recipes.json: images/s, the ratio to
    the first recipe, epochs in the budget and the last validation mean IU."""
    import json

    figures = REPO / "benchmarks" / "results" / "recipes-2026-12-04" / "bench_recipes.json"
    bench = json.loads(figures.read_text())
    order = ["today", "b2-preload", "b2-preload-bf16", "b8-bf16", "b16-fp32", "b16-bf16",
             "b16-bf16-lr3e-3", "b32-bf16"]  # fmt: skip
    rows = _table_rows(_section("results.md", "What the default recipe is made of"))
    assert len(rows) == len(order)
    for name, row in zip(order, rows, strict=True):
        speed = bench["speed"][name]
        expected = [f"{speed:.1f}", f"{speed / bench['speed']['today']:.2f}"]
        accuracy = bench["accuracy"].get(name)
        if accuracy:
            expected += [" / ".join(str(n) for n in accuracy["epochs"].values()),
                         f"{accuracy['val_mean_iu_last']:.3f}"]  # fmt: skip
        else:
            expected += ["", ""]
        assert [_plain(cell) for cell in row[1:5]] == expected, name


def test_the_gpu_kernel_table_is_the_committed_run():
    """docs/gpu.md's table of the kernel changes against that run's kernels.json."""
    import json

    run = REPO / "benchmarks" / "results" / "gpu-kernels-2026-11-27-h200" / "kernels.json"
    kernels = json.loads(run.read_text())["kernels"]
    text = (REPO / "docs" / "gpu.md").read_text()
    section = text[text.index("| changes, added in turn") :]
    rows = _table_rows(section)[: len(kernels)]
    for case, row in zip(kernels, rows, strict=True):
        expected = [f"{case['images_per_second']:.1f}", f"{case['speedup_vs_before']:.2f}x",
                    f"{100 * case['data_wait_share']:.0f} %"]  # fmt: skip
        assert row[1:4] == expected, case["case"]


def test_the_orchestration_table_is_the_committed_benchmark():
    """docs/orchestration.md's before/after table against bench_orchestration.sh's own
    table of that run (the numeric columns, row by row)."""
    figures = REPO / "benchmarks" / "results" / "orchestration-2026-12-04"
    measured = _table_rows((figures / "bench_orchestration.md").read_text())
    text = (REPO / "docs" / "orchestration.md").read_text()
    shown = _table_rows(text[text.index("| run | command | wall s") :])[: len(measured)]
    assert len(measured) == 4
    for source, row in zip(measured, shown, strict=True):
        assert row[2:] == source[2:], row[0]


def test_the_stride_ceiling_table_is_the_committed_benchmark():
    """docs/results.md's ceiling table against benchmarks/fcn_ceiling.py's JSON."""
    import json

    figures = REPO / "benchmarks" / "results" / "fcn-ceiling-2026-12-05" / "fcn_ceiling.json"
    ceiling = json.loads(figures.read_text())
    rows = _table_rows(_section("results.md", "How far is mean IU 0.80?"))
    assert [row[0].split()[0] for row in rows] == list(ceiling["strides"])
    for row, scores in zip(rows, ceiling["strides"].values(), strict=True):
        expected = [scores["mean_iu"], *scores["per_class_iu"]]
        assert row[1:] == [f"{value:.3f}" for value in expected], row[0]


def _camvid_run(run: dict) -> list[str]:
    """One CamVid run's cells, in %: global and class-average accuracy, mean IU, per-class
    IU; then its FCN-8s epochs, train minutes and whether it converged."""
    m = run["metrics"]
    return ([f"{100 * m[k]:.1f}" for k in ("pixel_acc", "mean_acc", "mean_iu")]
            + [f"{100 * m['per_class_iu'][c]:.1f}" for c in CAMVID_CLASSES]
            + [_epochs([run]), f"{run['train_minutes']:.0f}",
               "yes" if run["converged"] else "no"])  # fmt: skip


def test_the_full_size_camvid_table_is_the_committed_reports():
    """docs/results.md's "CamVid at full size" table: the full-size study's one run and
    the same setting and seed at half size, each read back from its results.json."""
    import json

    reports = REPO / "reports"
    (full,) = json.loads((reports / "camvid_full_converged" / "results.json").read_text())["runs"]
    half = json.loads((reports / "camvid_converged_p10" / "results.json").read_text())["runs"]
    same = next(r for r in half if (r["setting_name"], r["seed"]) == ("whole", full["seed"]))
    rows = _table_rows(_section("results.md", "CamVid at full size"))
    assert [row[0] for row in rows] == ["360x480", "180x240"]
    assert [row[1:] for row in rows] == [_camvid_run(full), _camvid_run(same)]
