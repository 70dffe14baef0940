#!/usr/bin/env bash
# What the orchestration costs: the whole pipeline on a tiny synthetic dataset (8/2/2
# images of 48x64, one epoch per net, width 0.03125) at a baseline revision and at HEAD,
# one after the other in this run, ROUNDS times; each in a copy of the project with its
# own git repository, run the way its scripts/pipeline.sh runs it (without the set-up).
# Prints wall and CPU seconds, the TCP ports that started listening during the run,
# the "View at" links printed, and FCN-8s test mean IU (the same at both, or the
# comparison is void).
#   bash benchmarks/bench_orchestration.sh [BASELINE_REV] [ROUNDS]   (default 5432a8e 2)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
baseline=${1:-5432a8e}
rounds=${2:-2}
venv_bin=$repo/.venv/bin
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unset PREFECT_API_URL

copy() {  # copy REV DEST: the revision's files, tiny params, a git repository
  mkdir -p "$2"
  git -C "$repo" archive "$1" | tar -x -C "$2"
  (cd "$2" && "$venv_bin/python" - <<'PY'
import yaml
p = yaml.safe_load(open("params.yaml"))
p["data"]["synthetic"].update(splits={"train": 8, "val": 2, "test": 2}, height=48, width=64)
for group in ("data", "stats", "patches"):
    p[group]["workers"] = 1
p["patches"]["patches_per_image"] = 2
p["train"].update(width=0.03125, batch_size=2, workers=0, device="cpu")
p["epochs"] = {"fcn32s": 1, "fcn16s": 1, "fcn8s": 1}
p["evaluate"].update(workers=0, overlays=2, device="cpu")
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
PY
  git init -q && git add -A && git -c user.name=bench -c user.email=bench@localhost commit -qm copy)
}

run() {  # run LABEL DIR
  local label=$1 dir=$2 command sampler
  command=$(sed -n 's/^exec //p' "$dir/scripts/pipeline.sh")  # what pipeline.sh runs
  ss -Hltn | awk '{print $4}' | sort -u > "$work/before"
  (while true; do ss -Hltn | awk '{print $4}'; sleep 0.5; done) > "$work/during" &
  sampler=$!
  (cd "$dir" && PATH=$venv_bin:$PATH PYTHONPATH=$dir /usr/bin/time -f "%e %U %S" \
      -o "$work/time" bash -c "$command" > "$work/$label.log" 2>&1) || echo "$label failed"
  kill "$sampler"
  read -r wall user sys < "$work/time"
  ports=$(sort -u "$work/during" | comm -13 "$work/before" - | wc -l)
  links=$(grep -c "View at" "$work/$label.log" || true)
  miou=$("$venv_bin/python" -c "import json;print(round(json.load(open('$dir/metrics/fcn8s.json'))['mean_iu'],4))")
  printf "| %s | %s | %.1f | %.1f | %s | %s | %s |\n" "$label" "$command" "$wall" \
    "$(awk "BEGIN{print $user + $sys}")" "$ports" "$links" "$miou"
}

echo "| run | command | wall s | CPU s | new listening ports | View at lines | FCN-8s mean IU |"
echo "|---|---|---|---|---|---|---|"
for round in $(seq "$rounds"); do
  copy "$baseline" "$work/base-$round" && run "baseline $baseline ($round)" "$work/base-$round"
  copy HEAD "$work/head-$round" && run "HEAD ($round)" "$work/head-$round"
done
