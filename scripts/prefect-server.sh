#!/usr/bin/env bash
# Self-hosted, offline Prefect for this project: a server on 127.0.0.1, a
# process worker for the `fcn-local` work pool, and the deployments of
# prefect.yaml (`fcn-pipeline/reproduce`, `fcn-pipeline/experiment`).
#
#   bash scripts/prefect-server.sh start    # server + worker + `prefect deploy --all`
#   source .prefect-local/env               # PREFECT_API_URL for this shell
#   prefect deployment run 'fcn-pipeline/reproduce' --watch
#   bash scripts/prefect-server.sh status
#   bash scripts/prefect-server.sh stop     # stops the worker, then the server
#
# State (pids, logs, the env file) goes to $FCN_PREFECT_DIR (default
# .prefect-local/ in the project); the SQLite database to $PREFECT_HOME
# (default $FCN_PREFECT_DIR/home). The port is $PREFECT_SERVER_API_PORT
# (default 4200). Nothing binds anywhere but 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PWD  # prefect.yaml reads {{ $PWD }} at deploy time: the project root

# Use the project's virtualenv (creating it on first use) unless the tools are
# already on PATH, as in the tests' temporary copies of the project.
if [ -d .venv ] || ! command -v prefect >/dev/null 2>&1; then
  source scripts/bootstrap.sh
fi

state_dir=$(mkdir -p "${FCN_PREFECT_DIR:-.prefect-local}" && cd "${FCN_PREFECT_DIR:-.prefect-local}" && pwd)
port=${PREFECT_SERVER_API_PORT:-4200}
pool=${FCN_WORK_POOL:-fcn-local}
export PREFECT_HOME=${PREFECT_HOME:-$state_dir/home}
export PREFECT_SERVER_API_HOST=127.0.0.1
export PREFECT_SERVER_API_PORT=$port
export PREFECT_API_URL="http://127.0.0.1:$port/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_CLI_PROMPT=false
export DO_NOT_TRACK=1
mkdir -p "$PREFECT_HOME"

alive() {  # alive NAME: the process recorded in NAME.pid is running
  local pid
  pid=$(cat "$state_dir/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

healthy() {
  python - "$PREFECT_API_URL/health" <<'EOF' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
    sys.exit(0 if response.status == 200 else 1)
EOF
}

launch() {  # launch NAME COMMAND...: run in its own session (process group), log and record pid
  local name=$1
  shift
  setsid "$@" >>"$state_dir/$name.log" 2>&1 </dev/null &
  echo $! >"$state_dir/$name.pid"
}

halt() {  # halt NAME SECONDS: SIGTERM NAME's process group, SIGKILL it after SECONDS
  local name=$1 grace=$2 pid
  pid=$(cat "$state_dir/$name.pid" 2>/dev/null) || return 0
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 $((grace * 4))); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "stopped $name (pid $pid)"
  fi
  rm -f "$state_dir/$name.pid"
}

halt_flow_runs() {  # the worker starts each flow run in its own session: stop those too
  local worker child runs=()
  worker=$(cat "$state_dir/worker.pid" 2>/dev/null) || return 0
  for child in $(ps -o pid= --ppid "$worker" 2>/dev/null); do
    runs+=("$child")
    kill -TERM -- "-$child" 2>/dev/null || kill -TERM "$child" 2>/dev/null || true
  done
  [ "${#runs[@]}" -gt 0 ] || return 0
  local running
  for _ in $(seq 1 40); do  # up to 10 s to exit cleanly
    running=0
    for child in "${runs[@]}"; do
      if kill -0 "$child" 2>/dev/null; then running=1; fi
    done
    [ "$running" -eq 1 ] || break
    sleep 0.25
  done
  for child in "${runs[@]}"; do
    kill -KILL -- "-$child" 2>/dev/null || true
  done
  echo "stopped flow run process(es) ${runs[*]}"
}

start() {
  if alive server && healthy; then
    echo "server already running (pid $(cat "$state_dir/server.pid")) at $PREFECT_API_URL"
  else
    halt server 20
    echo "starting Prefect server on $PREFECT_API_URL (database under $PREFECT_HOME; log $state_dir/server.log)"
    launch server prefect server start --host 127.0.0.1 --port "$port" --analytics-off
    local waited=0
    until healthy; do
      if ! alive server; then
        echo "error: the Prefect server exited; last lines of $state_dir/server.log:" >&2
        tail -n 30 "$state_dir/server.log" >&2
        exit 1
      fi
      if [ "$waited" -ge "${FCN_PREFECT_START_TIMEOUT:-180}" ]; then
        echo "error: no answer from $PREFECT_API_URL after $waited s (see $state_dir/server.log)" >&2
        halt server 20
        exit 1
      fi
      sleep 1
      waited=$((waited + 1))
    done
    echo "server up after ${waited} s"
  fi

  # One run at a time across both deployments: DVC holds a repository lock.
  prefect --no-prompt work-pool create "$pool" --type process --overwrite >/dev/null
  prefect --no-prompt work-pool set-concurrency-limit "$pool" 1 >/dev/null

  if alive worker; then
    echo "worker already running (pid $(cat "$state_dir/worker.pid"))"
  else
    echo "starting process worker for pool '$pool' (log $state_dir/worker.log)"
    launch worker prefect worker start --pool "$pool" --type process --limit 1 \
      --name "fcn-local-worker-$port"
  fi

  # Deploy from the project root: prefect.yaml records this directory as the
  # flow runs' working directory.
  prefect --no-prompt deploy --all --prefect-file prefect.yaml

  cat >"$state_dir/env" <<EOF
export PREFECT_API_URL=$PREFECT_API_URL
EOF
  echo
  echo "Prefect API: $PREFECT_API_URL   (dashboard: http://127.0.0.1:$port)"
  echo "In your shell:  source $state_dir/env"
  echo "Then:           prefect deployment run 'fcn-pipeline/reproduce' --watch"
}

status() {
  local code=0
  if alive server; then
    if healthy; then
      echo "server: running (pid $(cat "$state_dir/server.pid")) at $PREFECT_API_URL"
    else
      echo "server: process $(cat "$state_dir/server.pid") alive but $PREFECT_API_URL does not answer"
      code=1
    fi
  else
    echo "server: stopped"
    code=3
  fi
  if alive worker; then
    echo "worker: running (pid $(cat "$state_dir/worker.pid")), pool '$pool'"
  else
    echo "worker: stopped"
    code=3
  fi
  if [ "$code" -eq 0 ]; then
    prefect deployment ls
  fi
  return "$code"
}

case "${1:-}" in
  start) start ;;
  stop)
    # A run in progress is stopped first (DVC re-runs an interrupted stage next
    # time). The process worker (prefect 3.9) does not always exit on
    # SIGTERM/SIGINT; it holds no state of its own, so it is killed after a
    # short grace period.
    halt_flow_runs
    halt worker 5
    halt server 20
    rm -f "$state_dir/env"
    ;;
  status) status ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
