#!/usr/bin/env bash
# Set up what is missing, then run every test, the slow ones (real Rasa servers) included.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -ra "$@"
