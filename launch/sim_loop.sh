#!/usr/bin/env bash
# Start a policy server and a simulated robot together on loopback; stop both on exit.
#
#   launch/sim_loop.sh CHECKPOINT [TASK] [HZ] [EPISODES] [-- extra sim-robot args]
#
# TASK defaults to the checkpoint's task (meta.json), HZ to 50, EPISODES to 10.
# Environment: PORT (default 5555), POLCACHE (default "python -m polcache.cli"),
# METRICS_DIR (if set, both sides write metrics JSON lines there), SERVE_ARGS (extra `serve`
# options, e.g. "--verify 16 --verify-min-past 3" or "--device cuda").
set -euo pipefail

if [ $# -lt 1 ]; then
  sed -n '4,8p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
checkpoint=$1; shift
task=${1:-}; [ $# -gt 0 ] && shift
hz=${1:-50}; [ $# -gt 0 ] && shift
episodes=${1:-10}; [ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift

port=${PORT:-5555}
address="tcp://127.0.0.1:${port}"
read -r -a polcache <<< "${POLCACHE:-python -m polcache.cli}"
read -r -a serve_args <<< "${SERVE_ARGS:-}"
if [ -z "$task" ]; then
  task=$(python -c 'import json,sys; print(json.load(open(sys.argv[1] + "/meta.json")).get("task", ""))' \
    "$checkpoint" 2>/dev/null) || { echo "sim_loop: $checkpoint/meta.json: not readable (not a checkpoint?)" >&2; exit 2; }
  [ -n "$task" ] || { echo "sim_loop: the checkpoint names no task; pass TASK" >&2; exit 2; }
fi
# A server already there (one left running) would answer the robot, whose result would then be
# another policy's: refused, as `polcache launch` refuses a port in use.
in_use() { echo "sim_loop: port $port on 127.0.0.1 is already in use (another server?): set PORT" >&2; exit 2; }
python - "$port" 2>/dev/null <<'EOF' || in_use
import socket, sys
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds: a stopped run's TIME_WAIT is free
    s.bind(("127.0.0.1", int(sys.argv[1])))
EOF
server_metrics=(); robot_metrics=()
if [ -n "${METRICS_DIR:-}" ]; then
  mkdir -p "$METRICS_DIR"
  server_metrics=(--metrics-file "$METRICS_DIR/server.jsonl")
  robot_metrics=(--metrics-file "$METRICS_DIR/robot.jsonl")
fi

server_pid=""
robot_pid=""
stop() {  # TERM, wait up to 5 s, then KILL
  local pid=$1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  stop "$robot_pid"
  stop "$server_pid"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"${polcache[@]}" serve --checkpoint "$checkpoint" --bind "$address" "${server_metrics[@]}" "${serve_args[@]}" &
server_pid=$!

# The robot waits for the server's handshake reply itself (checkpoint loading takes a while).
# It runs in the background so a signal to this script is handled at once, not after it ends.
"${polcache[@]}" sim-robot --task "$task" --hz "$hz" --episodes "$episodes" --server "$address" \
  --connect-timeout 120 "${robot_metrics[@]}" "$@" &
robot_pid=$!
while kill -0 "$robot_pid" 2>/dev/null; do  # a server that exits (a bad checkpoint) ends the run at once,
  if ! kill -0 "$server_pid" 2>/dev/null; then  # not after the robot's 120 s connect timeout
    echo "sim_loop: the server exited before the robot finished (its error is above)" >&2
    exit 1
  fi
  sleep 0.2
done
status=0
wait "$robot_pid" || status=$?
robot_pid=""
exit "$status"
