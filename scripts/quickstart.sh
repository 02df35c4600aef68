#!/usr/bin/env bash
# Set up and run the main job on the embedded default: `polcache launch configs/launch/sim.yaml` —
# a ZeroMQ policy server hosting the shipped reach-v3 checkpoint, the dashboard (where installed)
# and a MuJoCo robot ticking at 50 Hz against it, each pinned to its own core. Ends by itself after
# EPISODES episodes (default 20) and prints success rate (95% CI), period error and
# observation-to-action latency. Extra arguments are config overrides (key=value).
# In-process evaluation without the transport: polcache eval --checkpoint polcache/assets/checkpoints/reach-v3
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh sim
export MUJOCO_GL="${MUJOCO_GL:-egl}"
# EPISODES only when set: sim.yaml runs 20, and an override given twice with two values is refused.
exec python -m polcache.cli launch configs/launch/sim.yaml ${EPISODES:+"robot.episodes=$EPISODES"} "$@"
