# Sourced by scripts/pipeline.sh and scripts/test.sh: make sure .venv exists and holds
# exactly the locked dependency set (requirements.lock, written by scripts/lock.sh) and
# this project (editable), then put it first on PATH. Reinstalls only when
# pyproject.toml or requirements.lock changed since the last install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python_bin=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp=".venv/.installed-$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setting up .venv with $("$python_bin" --version) (first run takes a few minutes)" >&2
  [ -x .venv/bin/python ] || "$python_bin" -m venv .venv
  pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" -r requirements.lock
  "${pip[@]}" --no-deps -e .
  rm -f .venv/.installed-*
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
