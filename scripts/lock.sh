#!/usr/bin/env bash
# Refresh requirements.lock: the exact versions that pyproject.toml's ranges resolve to
# today in a fresh virtual environment (Python 3.11, x86_64, pip and this machine's pip
# configuration), which scripts/bootstrap.sh then installs on every machine. Run it after
# changing a dependency in pyproject.toml, rerun the pipeline, commit both.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python_bin=${PYTHON:-$(command -v python3.11 || command -v python3)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python_bin" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev]'
{
  echo "# The whole dependency set of fcn-pipeline[dev], pinned (scripts/lock.sh wrote it;"
  echo "# $("$work/venv/bin/python" --version), $(uname -m)). scripts/bootstrap.sh installs"
  echo "# exactly these, then the project itself without dependencies."
  "$work/venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check
} > requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "wrote requirements.lock ($(grep -c '==' requirements.lock) pinned packages)"
