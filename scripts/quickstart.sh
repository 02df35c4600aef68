#!/usr/bin/env bash
# Set up and run the main job on the embedded default: the full real-time loop on loopback —
# a ZeroMQ policy server hosting the shipped reach-v3 checkpoint and a MuJoCo robot ticking at
# 50 Hz against it. Prints success rate (95% CI), period error and observation-to-action latency.
# In-process evaluation without the transport: polcache eval --checkpoint polcache/assets/checkpoints/reach-v3
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh sim
export MUJOCO_GL="${MUJOCO_GL:-egl}"
exec bash launch/sim_loop.sh polcache/assets/checkpoints/reach-v3 reach-v3 50 "${EPISODES:-20}" -- "$@"
