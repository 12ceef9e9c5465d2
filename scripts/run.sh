#!/usr/bin/env bash
# Set up what is missing, then run the assistant (Rasa, action server, hub) on 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec .venv/bin/xiaozhi run "$@"
