#!/usr/bin/env bash
# GPU readiness check: one command, at most 9.5 minutes on one GPU, run whenever a GPU
# machine is lent. From the repository root:
#
#   bash scripts/gpu-check.sh              # on the GPU machine
#   bash scripts/gpu-check.sh --dry-run    # on a CPU: same code paths at tiny sizes
#
# Parts, each under a hard time limit (`timeout`); a part that fails or times out is
# recorded and the next one runs; the exit status is non-zero if anything failed:
#   setup      pick the Python that has the most of what is needed (FCN_PYTHON, .venv,
#              python3.11, python3), print what is missing, and try to install it:
#              from carried wheels (--wheels DIR, default .whl/ if present) into a
#              scratch prefix (what that Python has is kept), or with
#              `scripts/bootstrap.sh` when .venv is absent and a package index answers
#   tests      pytest -m cuda tests/test_cuda.py (skipped, with the reason, on a CPU)
#   benchmark  benchmarks/bench_gpu.py: FCN-8s train step, width 1.0, 375x500, batch 1
#              and 8, bf16 + channels_last next to fp32 NCHW (CPU: tiny, fp32 NCHW vs
#              channels_last)
#   kernels    benchmarks/bench_training.py --compare-kernels --profile: real training
#              epochs (train_one_epoch) of FCN-8s, width 1.0, batch 4, 160 synthetic
#              images of 360x480, as CUDA training ran before (deterministic cuDNN
#              algorithms, the loss read back every step, flips on the host, unfused
#              Adam) and with each change added in turn up to now, then a profile of
#              one epoch (CPU: tiny)
#   train      `dvc exp run` of the whole pipeline in a temporary copy of the project
#              (own git repo): CamVid (FCN_CAMVID_ROOT, ../shared/datasets/camvid,
#              shared/datasets/camvid; else a synthetic set at CamVid's size), width
#              1.0, He-initialised, on CUDA; prints each variant's data-wait share
#              (dry run: the tiny synthetic pipeline on the CPU, up to train@fcn32s)
#
# Every figure goes to one JSON file: --json PATH, else $OUT/gpu-check.json when $OUT
# is set, else a new directory under ${TMPDIR:-/tmp}; each part's log lies beside it
# (<name>-<part>.log).
#
# Options: --dry-run, --json PATH, --budget SECONDS (default 570; dry run 720),
#          --wheels DIR, --no-install, --camvid PATH, --keep (keep the scratch directory)
#
#   bash scripts/gpu-check.sh --fetch-wheels .whl
# run where a package index answers, downloads into .whl/ (git-ignored; ~60 MB) the
# wheels that a GPU machine's stock Python lacks (pydantic, dvc, dvclive, prefect and
# their dependencies, for Python ${FCN_DEVICE_PYTHON:-3.12} on x86-64 Linux) and
# exits; carry .whl along with the run.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

mode=gpu json="" budget="" install=1 keep=0 camvid="" fetch=""
wheels=${FCN_WHEELS:-}
[ -z "$wheels" ] && [ -d .whl ] && wheels=.whl
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) mode=dry-run ;;
    --json) json=${2:?--json needs a path}; shift ;;
    --budget) budget=${2:?--budget needs seconds}; shift ;;
    --wheels) wheels=${2:?--wheels needs a directory}; shift ;;
    --no-install) install=0 ;;
    --camvid) camvid=${2:?--camvid needs a path}; shift ;;
    --keep) keep=1 ;;
    --fetch-wheels) fetch=${2:?--fetch-wheels needs a directory}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu-check: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

fetch_wheels() {  # fetch_wheels DIR: what a GPU machine's stock Python lacks, as wheels
  local dir=$1 here=${FCN_PYTHON:-$(command -v .venv/bin/python || command -v python3)}
  local version=${FCN_DEVICE_PYTHON:-3.12} requirements
  requirements=$("$here" scripts/gpu_check.py requirements pydantic dvc dvclive prefect) || exit 1
  mkdir -p "$dir"
  # hydra-core (under dvc) needs antlr4-python3-runtime 4.9, published as an sdist only:
  # build its pure-Python wheel here.
  # shellcheck disable=SC2086  # $requirements: one requirement per word
  "$here" -m pip wheel --quiet --no-deps -w "$dir" 'antlr4-python3-runtime==4.9.*' &&
    "$here" -m pip download --quiet --only-binary=:all: --python-version "$version" \
      --implementation cp --abi "cp${version//./}" --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
      --find-links "$dir" -d "$dir" $requirements || exit 1
  echo "gpu-check: $(find "$dir" -name '*.whl' | wc -l) wheels, $(du -sh "$dir" | cut -f1) in $dir;" \
    "carry it to the GPU machine (the working tree may be 64 MiB in all)"
}

if [ -n "$fetch" ]; then
  fetch_wheels "$fetch"
  exit 0
fi

# Per-part time limits (seconds): a GPU run fits 9.5 minutes when the environment is
# there (H200, 2026-11-27, second run: 426 s in all; tests 29 s, benchmark 93 s,
# kernels 48 s, train 219 s).
if [ "$mode" = gpu ]; then
  budget=${budget:-570}; t_install=150; t_tests=90; t_bench=120; t_kernels=90; t_train=300
else  # a 2-core CPU: a minute or two in all when quiet, several when others share it
  budget=${budget:-720}; t_install=150; t_tests=120; t_bench=120; t_kernels=120; t_train=300
fi
deadline=$((SECONDS + budget))

if [ -z "$json" ]; then
  if [ -n "${OUT:-}" ]; then
    json=$OUT/gpu-check.json
  else
    json=${TMPDIR:-/tmp}/gpu-check-$(date +%Y%m%d-%H%M%S)/gpu-check.json
  fi
fi
mkdir -p "$(dirname "$json")" || exit 2
json=$(cd "$(dirname "$json")" && pwd)/$(basename "$json")
logs=${json%.json}
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
cleanup() { [ "$keep" = 1 ] && echo "scratch kept: $work" || rm -rf "$work"; }
trap cleanup EXIT
setup_log=$logs-setup.log
: >"$setup_log"
echo "gpu-check: mode $mode, budget ${budget} s, figures to $json"

# --- setup: the Python to run with ------------------------------------------------------

# Prefer this checkout's modules over an editable install of another copy.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

helper() { "$py" scripts/gpu_check.py "$@"; }

choose_python() {  # sets py to the best candidate (empty if none runs)
  local best=-100000 seen="" candidate path score
  py=""
  for candidate in "${FCN_PYTHON:-}" .venv/bin/python python3.11 python3 python; do
    [ -n "$candidate" ] || continue
    path=$(command -v "$candidate" 2>/dev/null) || continue
    case " $seen " in *" $path "*) continue ;; esac
    seen="$seen $path"
    score=$("$path" scripts/gpu_check.py probe --score "$mode" 2>>"$setup_log") || continue
    echo "setup: $path fits with score $score" >>"$setup_log"
    if [ "$score" -gt "$best" ]; then best=$score py=$path; fi
  done
}

index_answers() {  # can pip fetch a small package within seconds?
  timeout 30 "$py" -m pip download --no-deps --quiet --timeout 5 --retries 0 \
    --dest "$work/pip-probe" pyyaml >>"$setup_log" 2>&1
}

install_missing() {  # try to provide what $py lacks; appends to setup_log
  local missing
  missing=$(helper missing --env "$work/env.json" --pip-names)
  [ -n "$missing" ] || return 0
  if [ "$install" = 0 ]; then echo "setup: --no-install: not installing $missing"; return 0; fi
  if [ -n "$wheels" ]; then
    # --prefix (unlike --target) keeps what $py already has and adds only what lacks.
    echo "setup: installing $missing from the wheels in $wheels into a scratch prefix"
    # shellcheck disable=SC2086  # $missing: one requirement per word
    if timeout "$t_install" "$py" -m pip install --quiet --no-index --find-links "$wheels" \
      --prefix "$work/prefix" $missing >>"$setup_log" 2>&1; then
      PYTHONPATH="$("$py" -c 'import sys, sysconfig
paths = {sysconfig.get_path(k, vars={"base": sys.argv[1], "platbase": sys.argv[1]})
         for k in ("purelib", "platlib")}
print(":".join(sorted(paths)))' "$work/prefix"):$PYTHONPATH"
      export PYTHONPATH
    else
      echo "setup: installing from $wheels failed (see $setup_log)"
    fi
    return 0
  elif [ ! -d .venv ] && index_answers; then
    echo "setup: no .venv; a package index answers: scripts/bootstrap.sh (pinned versions)"
    timeout "$t_install" bash -c 'source scripts/bootstrap.sh' >>"$setup_log" 2>&1 \
      || echo "setup: bootstrap failed or timed out (see $setup_log)"
  else
    echo "setup: nothing installed (.venv present, or no package index answers);" \
      "carry wheels in .whl/ (see README) to fill the gap"
  fi
  choose_python
}

choose_python
if [ -z "$py" ]; then
  echo "gpu-check: no Python found (tried FCN_PYTHON, .venv/bin/python, python3.11, python3)" >&2
  printf '{"schema": "fcn-gpu-check/1", "mode": "%s", "failed": ["setup: no Python"]}\n' \
    "$mode" >"$json"
  exit 1
fi
helper probe --out "$work/env.json" >/dev/null
install_missing
helper probe --out "$work/env.json" >/dev/null
"$py" - "$work/env.json" "$mode" <<'EOF'
import json, sys
info, mode = json.load(open(sys.argv[1])), sys.argv[2]
print(f"setup: {info['python']} (Python {info['python_version']}), torch {info['torch']} "
      f"(pinned {info['torch_pinned']}), CUDA {'yes: ' + info['device_name'] if info['cuda_available'] else 'no'}")
for part, missing in info["missing"].items():
    print(f"setup: {part}: " + ("ready" if not missing else "MISSING " + " ".join(missing)))
if not info["torch"]:
    print("setup: no torch in this Python: set FCN_PYTHON to one that has it (never installed here)")
EOF

# --- the parts ------------------------------------------------------------------------------

part_limit() {  # part_limit WANT RESERVE: WANT, or less so that RESERVE s stay for the rest
  local left=$((deadline - SECONDS - $2))
  echo $(($1 < left ? $1 : left))
}

run_part() {  # run_part NAME LIMIT COMMAND...: run under `timeout`, log, record the status
  local name=$1 limit=$2 log=$logs-$1.log missing start rc status reason=""
  shift 2
  : >"$log"
  missing=$(helper missing --env "$work/env.json" --part "$name")
  if [ -n "$missing" ]; then
    status=skipped reason="missing modules: $missing"
  elif [ "$mode" = gpu ] && ! grep -q '"cuda_available": true' "$work/env.json"; then
    status=skipped reason="no CUDA device visible to $py (use --dry-run on a CPU)"
  elif [ "$limit" -lt 15 ]; then
    status=skipped reason="no time left in the ${budget} s budget"
  fi
  if [ -n "$reason" ]; then
    echo "== $name: $status: $reason"
    helper record --out "$work/part-$name.json" --status "$status" --reason "$reason" --log "$log"
    return
  fi
  echo "== $name (limit ${limit} s): $*"
  start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  case $rc in 0) status=passed ;; 124 | 137) status=timeout reason="after ${limit} s" ;; *) status=failed ;; esac
  tail -n "${GPU_CHECK_TAIL:-25}" "$log" | sed 's/^/   /'
  echo "== $name: $status (exit $rc, $((SECONDS - start)) s); log $log"
  helper record --out "$work/part-$name.json" --status "$status" --rc "$rc" \
    --seconds "$((SECONDS - start))" --limit "$limit" --log "$log" --reason "$reason"
}

# 1. The cuda tests (all skipped, with the reason, without a GPU).
run_part tests "$(part_limit "$t_tests" 240)" \
  "$py" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider \
  --junitxml "$work/tests-junit.xml"

# 2. The train-step benchmark.
if [ "$mode" = gpu ]; then
  bench_args=(--warmup 2 --min-seconds 1)
else
  bench_args=(--device cpu --width 0.03125 --size 32x48 --batches 1,2
    --configs fp32-nchw,fp32-cl --warmup 1 --min-seconds 0.2 --max-steps 5)
fi
run_part benchmark "$(part_limit "$t_bench" 180)" \
  "$py" benchmarks/bench_gpu.py "${bench_args[@]}" --json "$work/benchmark.json"

# 3. Real training epochs under the kernel settings of before and now.
if [ "$mode" = gpu ]; then
  kernels_args=(--device cuda --width 1.0 --batch-size 4 --workers 6 --synthetic 360x480
    --images 160 --epochs 2)
else
  kernels_args=(--device cpu --width 0.03125 --batch-size 2 --workers 0 --synthetic 48x64
    --images 8 --epochs 1 --steps 1)
fi
run_part kernels "$(part_limit "$t_kernels" 120)" \
  "$py" benchmarks/bench_training.py "${kernels_args[@]}" --compare-kernels --profile \
  --json "$work/kernels.json"

# 4. A short `dvc exp run` of the pipeline in a temporary copy (own git repo).
limit=$(part_limit "$t_train" 5)
exp_args=(--mode "$mode" --work "$work" --out "$work/train.json" --log "$logs-train.log"
  --limit "$((limit - 10))")
[ -n "$camvid" ] && exp_args+=(--camvid "$camvid")
GPU_CHECK_TAIL=8 run_part train "$limit" "$py" scripts/gpu_check.py exp "${exp_args[@]}"

helper merge --work "$work" --json "$json" --mode "$mode" --seconds "$SECONDS"
