"""Helpers of ``scripts/gpu-check.sh``: probe the environment, run the short ``dvc exp run``
(part 3), and merge every part's figures into one JSON file.

Standard library only, so that it runs (and reports what is missing) in any Python::

    python scripts/gpu_check.py probe --out env.json
    python scripts/gpu_check.py exp --mode gpu --work DIR --out train.json --limit 240
    python scripts/gpu_check.py merge --work DIR --json gpu-check.json --mode gpu
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "fcn-gpu-check/1"
PARTS = ("tests", "benchmark", "kernels", "train")
# Import names each part needs (the library's dependencies, then the tools).
LIBRARY = ["torch", "numpy", "pyarrow", "PIL", "skimage", "pydantic", "yaml", "tqdm"]
MODULES = {
    "tests": [*LIBRARY, "pytest"],
    "benchmark": LIBRARY,
    "kernels": LIBRARY,
    "train": [*LIBRARY, "matplotlib", "dvc", "dvclive", "prefect"],
}
TODO = [
    "DDP with NCCL over two or more GPUs: not checked (one GPU holds one NCCL rank); "
    "tests/test_cuda.py checks NCCL with a world of one, tests/test_distributed.py two "
    "ranks with gloo on the CPU."
]
VARIANTS = ("fcn32s", "fcn16s", "fcn8s")
# CamVid's split sizes (SegNet layout), for the synthetic stand-in at CamVid's size.
CAMVID_SPLITS = {"train": 367, "val": 101, "test": 233}


def write_json(path: Path, content: Any) -> None:
    """Write ``content`` through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- probe ----------------------------------------------------------------------------


def torch_pin() -> str | None:
    """The ``torch==X`` pin of pyproject.toml."""
    match = re.search(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text())
    return match.group(1) if match else None


def _importable(name: str) -> bool:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None


def probe() -> dict[str, Any]:
    """This interpreter: versions, CUDA, and the modules each part lacks."""
    wanted = {name for names in MODULES.values() for name in names}
    # A spec without an origin is a namespace package: a bare directory of that name on
    # the path (the repository's own dvclive/ logs, say), not the module.
    found = {name: _importable(name) for name in wanted}
    info: dict[str, Any] = {
        "python": sys.executable,
        "python_version": sys.version.split()[0],
        "torch_pinned": torch_pin(),
        "torch": None,
        "cuda_available": False,
        "device_name": None,
        "missing": {part: [m for m in names if not found[m]] for part, names in MODULES.items()},
    }
    if found["torch"]:
        try:
            import torch

            info["torch"] = torch.__version__
            info["torch_cuda"] = torch.version.cuda
            info["cuda_available"] = torch.cuda.is_available()
            if info["cuda_available"]:
                info["device_name"] = torch.cuda.get_device_name(0)
        except Exception as error:  # a broken install raises anything
            info["torch_error"] = f"{type(error).__name__}: {error}"
    return info


def fitness(info: dict[str, Any], mode: str) -> int:
    """Higher is better: CUDA (on a GPU run) first, then the fewest missing modules."""
    missing = {name for names in info["missing"].values() for name in names}
    cuda = 1000 if mode == "gpu" and info["cuda_available"] else 0
    return cuda + (100 if info["torch"] else 0) - 10 * len(missing)


def distributions(modules: list[str]) -> list[str]:
    """pip requirements (with pyproject.toml's version ranges) of import names, torch and
    torchvision left out: several GB, never carried as wheels."""
    names = {"PIL": "pillow", "skimage": "scikit-image", "yaml": "pyyaml", "pytest": "pytest"}
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    listed = project["dependencies"] + project["optional-dependencies"]["dev"]
    ranges = {re.split(r"[<>=!~ ]", spec, maxsplit=1)[0].lower(): spec for spec in listed}
    wanted = [names.get(module, module).lower() for module in modules]
    return [ranges.get(name, name) for name in wanted if name not in ("torch", "torchvision")]


# --- part 3: a short dvc exp run ---------------------------------------------------------


def camvid_candidates(explicit: str | None) -> list[Path]:
    """Where CamVid may be: --camvid, FCN_CAMVID_ROOT, ../shared and shared/ of the repo."""
    paths = [explicit, os.environ.get("FCN_CAMVID_ROOT")]
    paths += [str(REPO.parent / "shared/datasets/camvid"), str(REPO / "shared/datasets/camvid")]
    return [Path(p).resolve() for p in paths if p]


def copy_project(dest: Path) -> None:
    """The project's tracked and untracked-not-ignored files, as its own git repository."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    # An identity in the copy itself: `dvc exp run` commits too, and a fresh machine
    # has no global git identity.
    for command in (
        ["init", "-q"],
        ["config", "user.name", "gpu-check"],
        ["config", "user.email", "gpu-check@localhost"],
        ["add", "-A"],
        ["commit", "-q", "-m", "gpu-check copy"],
    ):
        subprocess.run(["git", *command], cwd=dest, check=True)


def shims(bin_dir: Path) -> None:
    """``dvc`` and ``fcn-pipeline`` commands that run this Python: a venv copied or
    carried to another path keeps its modules but its scripts' first lines break."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, module in (("dvc", "dvc"), ("fcn-pipeline", "flows.cli")):
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
        path.chmod(0o755)


def exp_overrides(mode: str, camvid: Path | None) -> tuple[list[str], str]:
    """``dvc exp run -S`` settings of each mode, and a line saying which data it uses."""
    if mode == "dry-run":
        settings = [
            "data.synthetic.height=48", "data.synthetic.width=64",
            "data.synthetic.splits.train=4", "data.synthetic.splits.val=2",
            "data.synthetic.splits.test=2",
            "data.workers=1", "stats.workers=1", "patches.workers=1",
            "patches.patches_per_image=2", "train.width=0.03125", "train.batch_size=2",
            "epochs.fcn32s=1", "epochs.fcn16s=1", "epochs.fcn8s=1",
            "train.workers=0", "train.device=cpu", "evaluate.device=cpu",
            "evaluate.workers=0", "evaluate.overlays=1",
        ]  # fmt: skip
        return settings, "synthetic, 4 train images of 48x64 (dry run)"
    settings = [
        "train.width=1.0", "train.device=cuda", "evaluate.device=cuda",
        "train.optimizer=adam", "train.lr=0.0001", "train.batch_size=4",
        "epochs.fcn32s=3", "epochs.fcn16s=2", "epochs.fcn8s=3",
        "train.workers=6", "train.eval_batch_size=8", "evaluate.batch_size=8",
        "evaluate.workers=4", "data.workers=0", "stats.workers=0", "patches.workers=0",
    ]  # fmt: skip
    if camvid is not None:
        return [*settings, "data.format=camvid", f"data.root={camvid}"], f"CamVid at {camvid}"
    synthetic = [
        "data.synthetic.height=360", "data.synthetic.width=480",
        *(f"data.synthetic.splits.{split}={n}" for split, n in CAMVID_SPLITS.items()),
    ]  # fmt: skip
    return [*settings, *synthetic], "synthetic at CamVid's size (360x480, 367/101/233 images)"


def run_with_limit(command: list[str], cwd: Path, env: dict, log: Path, limit: float) -> int:
    """Run ``command`` in its own process group, output to ``log``; at ``limit`` seconds
    stop the whole group (dvc, its stages, their Prefect servers). Returns the exit
    status, 124 on time-out."""
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            return process.wait(timeout=max(limit, 1))
        except subprocess.TimeoutExpired:
            stop_group(process)
            return 124


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_prefect_server(env: dict, log: Path, limit: float) -> subprocess.Popen | None:
    """One Prefect server on 127.0.0.1 for every stage of the run: each stage would
    otherwise start (and migrate the database of) a temporary one, 5-20 s apiece.
    Sets ``PREFECT_API_URL`` in ``env``; None (and stages on their own) if it does not
    answer within ``limit`` seconds."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
               "--port", str(port), "--analytics-off"]  # fmt: skip
    with open(log, "ab") as out:
        server = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    env["PREFECT_API_URL"] = url
                    return server
        except OSError:
            time.sleep(0.5)
    stop_group(server)
    return None


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM ``process``'s process group (children that outlived it too), SIGKILL
    whatever is left after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def result_files(project: Path) -> dict[Path, bytes]:
    """Each variant's DVCLive ``metrics.json`` and test metrics as they are now (the copy
    holds the committed reference run's: only those the run rewrites are its own)."""
    paths = [project / "dvclive" / v / "metrics.json" for v in VARIANTS]
    paths += [project / "metrics" / f"{v}.json" for v in VARIANTS]
    return {path: path.read_bytes() for path in paths if path.is_file()}


def rewritten(path: Path, before: dict[Path, bytes]) -> Any:
    """``path``'s JSON if the run wrote it (absent or different before), else None."""
    if not path.is_file() or before.get(path) == path.read_bytes():
        return None
    return read_json(path)


def read_variants(project: Path, before: dict[Path, bytes]) -> dict[str, Any]:
    """Last-epoch DVCLive figures and test metrics of each variant this run trained."""
    variants = {}
    for variant in VARIANTS:
        live = rewritten(project / "dvclive" / variant / "metrics.json", before)
        if not live:
            continue
        keys = ("train_loss", "val_mean_iu", "images_per_second", "data_wait_share")
        figures = {key: live.get(key) for key in keys}
        figures["epochs"] = live.get("step")  # flows/train.py logs epoch n as step n
        test = rewritten(project / "metrics" / f"{variant}.json", before) or {}
        figures["test_mean_iu"] = test.get("mean_iu")
        variants[variant] = figures
    return variants


def run_exp(args: argparse.Namespace) -> int:
    """Part 3: ``dvc exp run`` of the whole pipeline in a temporary copy of the project."""
    start = time.monotonic()
    project = Path(args.work) / "exp-project"
    copy_project(project)
    before = result_files(project)
    shims(Path(args.work) / "exp-bin")
    camvid = next((p for p in camvid_candidates(args.camvid) if (p / "trainannot").is_dir()), None)
    settings, dataset = exp_overrides(args.mode, camvid if args.mode == "gpu" else None)
    settings += args.set or []
    tried = ", ".join(str(p) for p in camvid_candidates(args.camvid))
    warnings = []
    if args.mode == "gpu" and camvid is None:
        warnings.append(f"CamVid not found (tried {tried}): ran on {dataset}")
    env = dict(os.environ)
    env["PATH"] = f"{Path(args.work) / 'exp-bin'}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(project), env.get("PYTHONPATH")]))
    env.update(CI="1", DVC_NO_ANALYTICS="1", PREFECT_HOME=str(Path(args.work) / "prefect-home"))
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"  # if no server below
    targets = args.target or ([] if args.mode == "gpu" else ["train@fcn32s"])
    command = ["dvc", "exp", "run", *(arg for s in settings for arg in ("-S", s)), *targets]
    print(f"train: {dataset}; {' '.join(command)}", flush=True)
    if targets:
        print(f"train: stages up to {', '.join(targets)} only (--target)", flush=True)
    log = Path(args.log)
    server = start_prefect_server(env, log, limit=90)
    if server is None:
        warnings.append("the Prefect server did not start: each stage started its own")
    with open(log, "a") as out:  # the caller's log: append
        out.write(f"$ {' '.join(command)}\n")
    limit = args.limit - (time.monotonic() - start) - 15  # time to stop and summarise
    try:
        rc = run_with_limit(command, project, env, log, limit)
    finally:
        if server is not None:
            stop_group(server)
    variants = read_variants(project, before)
    status = "passed" if rc == 0 else ("timeout" if rc == 124 else "failed")
    stages = f"up to {', '.join(targets)}" if targets else "all"
    if args.mode == "dry-run":
        stages += " (a dry run: the whole pipeline takes minutes on a CPU)"
    print(f"train: dvc exit {rc}; {dataset}; stages {stages}", flush=True)
    for variant, figures in variants.items():
        share = figures["data_wait_share"]
        print(
            f"train: {variant} {figures['epochs']} epochs, "
            f"{figures['images_per_second'] or 0:.1f} img/s, data wait "
            f"{'n/a' if share is None else f'{100 * share:.1f}%'}, val mean IU "
            f"{figures['val_mean_iu'] or 0:.3f}",
            flush=True,
        )
    write_json(Path(args.out), {
        "status": status, "dvc_rc": rc, "dataset": dataset, "settings": settings,
        "targets": targets or "all stages",
        "variants": variants, "warnings": warnings,
        "seconds": round(time.monotonic() - start, 1),
    })  # fmt: skip
    return rc


# --- merge --------------------------------------------------------------------------------


def junit_counts(path: Path) -> dict[str, Any] | None:
    """Passed/failed/skipped counts and skip reasons of a pytest JUnit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skip_reasons": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next(
            (child for child in case if child.tag in ("failure", "error", "skipped")), None
        )
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            reason = outcome.get("message", "")
            if reason not in counts["skip_reasons"]:
                counts["skip_reasons"].append(reason)
        else:
            counts["failed"] += 1
            counts["failures"].append(f"{name}: {(outcome.get('message') or '')[:300]}")
    return counts


def check_part(part: str, record: dict[str, Any], mode: str, warnings: list[str]) -> None:
    """Turn a part that exited 0 but did not do its work into a failure (with a reason)."""
    results, reason = record.get("results"), ""
    if part == "tests":
        counts = record["counts"]
        if counts is None:
            reason = "no JUnit report"
        elif mode == "gpu" and (counts["skipped"] or not counts["passed"]):
            reason = f"cuda tests skipped on a GPU run: {counts['skip_reasons']}"
    elif part == "benchmark":
        cases = (results or {}).get("cases", [])
        warnings += [f"benchmark batch {c['batch']} {c['config']}: {c['status']}"
                     for c in cases if c["status"] != "ok"]  # fmt: skip
        if not any(c["status"] == "ok" and c["images_per_second"] > 0 for c in cases):
            reason = "no benchmark case measured"
    elif part == "kernels":
        if not any(c["images_per_second"] > 0 for c in (results or {}).get("kernels", [])):
            reason = "no kernel setting measured"
    elif not (results or {}).get("variants"):
        reason = "no DVCLive metrics written"
    if reason:
        record["status"], record["reason"] = "failed", reason


def merge(args: argparse.Namespace) -> int:
    """Collect every part into ``--json``; print the summary; 1 if anything failed."""
    work = Path(args.work)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": args.mode,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": args.seconds,
        "environment": read_json(work / "env.json"),
        "parts": {},
        "todo": TODO,
        "failed": [],
        "warnings": [],
    }
    for part in PARTS:
        record = read_json(work / f"part-{part}.json") or {"status": "not run"}
        if part == "tests":
            record["counts"] = junit_counts(work / "tests-junit.xml")
        elif part == "benchmark":
            record["results"] = read_json(work / "benchmark.json")
        elif part == "kernels":
            record["results"] = read_json(work / "kernels.json")
        else:
            record["results"] = read_json(work / "train.json")
            report["warnings"] += (record["results"] or {}).get("warnings", [])
        if record["status"] == "passed":
            check_part(part, record, args.mode, report["warnings"])
        report["parts"][part] = record
        if record["status"] != "passed":
            report["failed"].append(
                f"{part}: {record['status']} {record.get('reason', '')}".strip()
            )
    write_json(Path(args.json), report)
    print_summary(report, Path(args.json))
    return 1 if report["failed"] else 0


def print_summary(report: dict[str, Any], path: Path) -> None:
    print(f"\n== gpu-check ({report['mode']}) summary: {path}")
    for part, record in report["parts"].items():
        detail = ""
        if record.get("seconds") is not None:
            detail = f" ({record['seconds']:.0f} s of {record['limit_s']:.0f} s)"
        print(f"   {part:<10} {record['status']}{detail} {record.get('reason', '')}")
    counts = report["parts"]["tests"].get("counts")
    if counts:
        print(f"   tests: {counts['passed']} passed, {counts['failed']} failed, "
              f"{counts['skipped']} skipped {counts['skip_reasons'] or ''}")  # fmt: skip
    for line in report["warnings"]:
        print(f"   warning: {line}")
    for line in report["todo"]:
        print(f"   TODO: {line}")
    print("   result: " + ("FAILED: " + "; ".join(report["failed"]) if report["failed"] else "ok"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    probe_parser = sub.add_parser("probe", help="versions, CUDA and missing modules as JSON")
    probe_parser.add_argument("--out", default=None)
    probe_parser.add_argument(
        "--score", choices=["gpu", "dry-run"], help="print only how well this Python fits"
    )
    exp = sub.add_parser("exp", help="part 3: dvc exp run in a temporary copy")
    exp.add_argument("--mode", choices=["gpu", "dry-run"], required=True)
    exp.add_argument("--work", required=True, help="scratch directory")
    exp.add_argument("--out", required=True, help="summary JSON")
    exp.add_argument("--log", required=True, help="dvc's output")
    exp.add_argument("--limit", type=float, required=True, help="seconds for the whole part")
    exp.add_argument("--camvid", default=None, help="CamVid root (SegNet layout)")
    exp.add_argument("--set", action="append", help="extra dvc exp run -S KEY=VALUE")
    exp.add_argument(
        "--target",
        action="append",
        help="stage to reproduce (repeatable); default: all on a GPU, train@fcn32s in a dry run",
    )
    missing = sub.add_parser("missing", help="modules a probe found missing")
    missing.add_argument("--env", required=True, help="the probe's JSON")
    missing.add_argument("--part", choices=PARTS, help="only this part's (default: all)")
    missing.add_argument("--pip-names", action="store_true", help="as pip distributions")
    requirements = sub.add_parser("requirements", help="pip requirements of import names")
    requirements.add_argument("modules", nargs="+")
    record = sub.add_parser("record", help="write one part's status JSON")
    record.add_argument("--out", required=True)
    record.add_argument("--status", required=True)
    record.add_argument("--rc", type=int, default=None)
    record.add_argument("--seconds", type=float, default=None)
    record.add_argument("--limit", type=float, default=None)
    record.add_argument("--log", default=None)
    record.add_argument("--reason", default=None)
    merged = sub.add_parser("merge", help="one JSON of every part, and the summary")
    merged.add_argument("--work", required=True)
    merged.add_argument("--json", required=True)
    merged.add_argument("--mode", choices=["gpu", "dry-run"], required=True)
    merged.add_argument("--seconds", type=float, default=None)
    args = parser.parse_args(argv)
    if args.command == "missing":
        info = read_json(Path(args.env)) or {"missing": {}}
        if args.part:
            print(" ".join(info["missing"].get(args.part, [])))
        else:
            every = sorted({name for names in info["missing"].values() for name in names})
            print(" ".join(distributions(every) if args.pip_names else every))
        return 0
    if args.command == "requirements":
        print("\n".join(distributions(args.modules)))
        return 0
    if args.command == "record":
        record = {"status": args.status, "rc": args.rc, "seconds": args.seconds}
        record.update(limit_s=args.limit, log=args.log, reason=args.reason or "")
        write_json(Path(args.out), record)
        return 0
    if args.command == "probe":
        info = probe()
        if args.out:
            write_json(Path(args.out), info)
        print(fitness(info, args.score) if args.score else json.dumps(info))
        return 0
    if args.command == "exp":
        return 0 if run_exp(args) == 0 else 1
    return merge(args)


if __name__ == "__main__":
    sys.exit(main())
