#!/usr/bin/env bash
# The main job: reproduce the DVC pipeline (default: the embedded synthetic
# dataset). Extra arguments go to `dvc repro`, e.g. `bash scripts/pipeline.sh stats`.
# The stages are plain programs: no Prefect server is started. To see the run in
# Prefect's UI, run it through the pipeline flow instead (README, "Orchestration").
source "$(dirname "$0")/bootstrap.sh"
exec dvc repro "$@"
