#!/usr/bin/env bash
# The whole test suite. Extra arguments go to pytest, e.g. `-k ingest`.
source "$(dirname "$0")/bootstrap.sh"
exec python -m pytest "$@"
