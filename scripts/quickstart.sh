#!/usr/bin/env bash
# Set up and run the main job on the embedded default: evaluate the shipped reach-v3 checkpoint
# in MuJoCo and print success rate (95% CI) and per-chunk latency.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[sim]"
export MUJOCO_GL="${MUJOCO_GL:-egl}"
polcache eval --checkpoint polcache/assets/checkpoints/reach-v3 --episodes "${EPISODES:-20}" "$@"
