#!/usr/bin/env bash
# Set up and run the whole suite (slow integration tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh sim,export,dev
export MUJOCO_GL="${MUJOCO_GL:-egl}"
python -m pytest -q "$@"
