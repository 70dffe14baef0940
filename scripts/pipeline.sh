#!/usr/bin/env bash
# The main job: reproduce the DVC pipeline (default: the embedded synthetic
# dataset). Extra arguments go to `dvc repro`, e.g. `bash scripts/pipeline.sh stats`.
#
# With no PREFECT_API_URL configured, flows.server starts one temporary Prefect
# server (127.0.0.1, throw-away database) for the whole run, so the stages share
# it instead of starting one each, and stops it however the run ends; the exit
# status is dvc's. With PREFECT_API_URL set, the stages use that server.
source "$(dirname "$0")/bootstrap.sh"
exec python -m flows.server -- dvc repro "$@"
