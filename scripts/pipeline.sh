#!/usr/bin/env bash
# The main job: reproduce the DVC pipeline (default: the embedded synthetic
# dataset). Extra arguments go to `dvc repro`, e.g. `bash scripts/pipeline.sh stats`.
source "$(dirname "$0")/bootstrap.sh"
exec dvc repro "$@"
