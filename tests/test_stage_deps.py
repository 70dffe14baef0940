"""dvc.yaml's code dependencies are derived, not remembered: every fcn_pipeline/ and
flows/ file a stage's command imports (its import closure, read from the source with
``ast``) must be listed in the stage's ``deps`` (itself or a directory holding it), so a
change to any of them makes ``dvc status`` report the stage as changed."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fcn_pipeline", "flows")


def module_file(name: str, root: Path = REPO) -> Path | None:
    """The file of module ``name`` in this project (a package's ``__init__.py``)."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _modules_of(node: ast.AST, package: str) -> set[str]:
    names: set[str] = set()
    for item in ast.walk(node):
        if isinstance(item, ast.Import):
            names |= {alias.name for alias in item.names}
        elif isinstance(item, ast.ImportFrom):
            base = item.module or ""
            if item.level:  # relative import
                parent = package.split(".")[: len(package.split(".")) - item.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in item.names}
    return names


def imported_modules(path: Path, only: set[str] | None = None, root: Path = REPO) -> set[str]:
    """Modules ``path`` imports anywhere (top level and inside functions); with ``only``,
    the top level and the bodies of the functions named there."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    if only is None:
        return _modules_of(tree, package)
    names: set[str] = set()
    for node in tree.body:
        is_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        if not is_function or node.name in only:
            names |= _modules_of(node, package)
    return names


def closure(start: set[str], root: Path = REPO, cli_functions: set[str] | None = None) -> set[str]:
    """The project files reached from modules ``start`` (parent packages included)."""
    seen: set[str] = set()
    pending = list(start)
    while pending:
        name = pending.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            path = module_file(".".join(parts[:depth]), root)
            if path is None:
                continue
            relative = str(path.relative_to(root))
            if relative in seen:
                continue
            seen.add(relative)
            only = cli_functions if relative == "flows/cli.py" else None
            pending += sorted(imported_modules(path, only, root))
    return seen


def stage_closure(stage: str, root: Path = REPO) -> set[str]:
    """Files the command ``fcn-pipeline <stage>`` runs: flows/cli.py's top level, its
    ``main`` and the stages' handler, the stage's module ``flows/<stage>.py`` (which the
    handler imports by name) and everything they import."""
    return closure({"flows.cli", f"flows.{stage}"}, root, cli_functions={"main", "_stage", "_fail"})


def declared(deps: list[str]) -> list[str]:
    return [dep.rstrip("/") for dep in deps if not dep.startswith("${")]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep + "/") for dep in deps)


def stage_deps(root: Path = REPO) -> dict[str, list[str]]:
    """Per stage name of dvc.yaml (foreach groups by their group name), its code deps."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        out[name] = declared(body["deps"])
    return out


def missing(root: Path = REPO) -> dict[str, list[str]]:
    result = {}
    for stage, deps in stage_deps(root).items():
        needed = sorted(stage_closure(stage, root))
        result[stage] = [p for p in needed if not covered(p, deps)]
    return result


def test_the_closure_follows_imports_inside_functions_and_parent_packages():
    files = stage_closure("train")
    assert "flows/train.py" in files and "fcn_pipeline/training.py" in files
    assert "fcn_pipeline/distributed.py" in files  # imported by training.py
    assert "fcn_pipeline/models/__init__.py" in files and "fcn_pipeline/__init__.py" in files
    assert "flows/ingest.py" not in files  # another stage's module is not run
    assert "flows/executor.py" not in files  # only the data stages map shards


def test_every_stage_lists_every_file_its_command_imports():
    assert missing() == {stage: [] for stage in stage_deps()}


def test_no_stage_lists_code_it_does_not_import():
    """A listed file the command never imports reruns the stage for nothing."""
    unused = {}
    for stage, deps in stage_deps().items():
        needed = stage_closure(stage)
        code = [dep for dep in deps if dep.split("/")[0] in PACKAGES]
        unused[stage] = [d for d in code if not any(covered(n, [d]) for n in needed)]
    assert unused == {stage: [] for stage in stage_deps()}


def test_a_dependency_removed_from_dvc_yaml_is_caught(tmp_path):
    copy = tmp_path / "project"
    for name in ("dvc.yaml", *PACKAGES):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            copy.mkdir(exist_ok=True)
            shutil.copy(source, copy / name)
    text = (copy / "dvc.yaml").read_text()
    (copy / "dvc.yaml").write_text(text.replace("        - fcn_pipeline/distributed.py\n", ""))
    gaps = missing(copy)
    assert "fcn_pipeline/distributed.py" in gaps["train"]
    assert "fcn_pipeline/distributed.py" in gaps["evaluate"]


@pytest.mark.slow
def test_touching_a_shared_module_makes_dvc_report_the_stages_changed(project_copy):
    """dvc status after a change to fcn_pipeline/distributed.py names it as a changed
    dependency of train@* and evaluate@*, and of no data stage."""
    module = project_copy / "fcn_pipeline" / "distributed.py"
    module.write_text(module.read_text() + "\n# touched\n")
    status = subprocess.run(["dvc", "status", "--json"], cwd=project_copy, capture_output=True,
                            text=True, check=True)  # fmt: skip
    report = yaml.safe_load(status.stdout)

    def changed_deps(stage: str) -> set[str]:
        return {
            path
            for entry in report.get(stage, [])
            if isinstance(entry, dict)
            for path in entry.get("changed deps", {})
        }

    for variant in ("fcn32s", "fcn16s", "fcn8s"):
        assert "fcn_pipeline/distributed.py" in changed_deps(f"train@{variant}")
        assert "fcn_pipeline/distributed.py" in changed_deps(f"evaluate@{variant}")
    for stage in ("ingest", "stats", "patches"):
        assert "fcn_pipeline/distributed.py" not in changed_deps(stage)
