#!/usr/bin/env bash
# Set up (CPU torch 2.13.0 from local disk first, so nothing pulls a CUDA build) and run the whole suite.
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[sim,export,dev]"
export MUJOCO_GL="${MUJOCO_GL:-egl}"
python -m pytest -q "$@"
