#!/bin/bash
# Everything this project checks on a lent GPU machine, in one call (GPU time is minutes):
# the CUDA tests, then bench_gpu.py (DP-T chunks: eager, graphs, fused kernels, bf16, BAC) and
# bench_vla.py on the GPU. Tables print; JSON is written to $OUT (default benchmarks/results).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   DEVICE=cpu QUICK=1 LAUNCH_ARGS="server.placement.cpus=[1] dashboard.placement.cpus=[1]" \
#     bash benchmarks/gpu_check.sh               # this script's own smoke test on a 2-CPU machine
#   BENCHES=vla bash benchmarks/gpu_check.sh     # the CUDA tests and bench_vla only (default: "gpu train launch vla")
#
# EXECUTORS=eager,graph+fused+norm limits bench_gpu's rows (the authors' executor always runs).
# "fairness": bench_fairness.py on the device, 4 and 16 phase-locked robots, one inference per robot
# against batched; "train": bench_train_step.py (what the per-step finite-loss check costs a training step on the GPU);
# "launch": configs/launch/workstation.yaml as a user runs it (cuda, bf16 with its parity gate, keys),
# with a simulated cue-reach robot and the dashboard's data read while it runs.
#
# The GPU machine has torch + CUDA but no registry: wheels of what it lacks (zarr, numcodecs,
# donfig, google-crc32c, pyzmq, msgspec, diffusers, importlib_metadata, and for "launch" mujoco,
# gymnasium, farama-notifications, glfw, pyopengl; cp312) are carried in .whl/.
# A trained VLA checkpoint and its BAC schedule, where carried in .gpu/vla and
# .gpu/vla_sched.json, add the VLA rows.
set -u
OUT=${OUT:-$PWD/benchmarks/results}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
if [ -d .whl ] && [ "$DEVICE" != cpu ]; then
  python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v -i "warning" | tail -2
  # the package as installed (pyproject maps export/ and envs/ into polcache)
  python -m pip install -q --no-deps --no-build-isolation -e . -e ./client 2>&1 | grep -v -i "warning" | tail -2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed"

if [ "${TESTS:-1}" != 0 ]; then  # TESTS=0: the benchmarks alone
  echo "== CUDA tests"
  timeout 300 python -m pytest -q -rfEs -p no:cacheprovider tests/test_residual_norm.py tests/test_backend_speed_paths.py \
    tests/test_device.py tests/test_trt.py tests/test_export.py::test_exporting_leaves_the_callers_policy_on_its_device \
    2>&1 | tail -25
fi

echo "== dashboard GPU load sample (nvidia-smi)"
python -c "from polcache.dashboard.system import SystemSampler; print('gpu utilisation %:', SystemSampler().sample_gpu())"

[ -n "${TESTS_ONLY:-}" ] && exit 0  # the CUDA tests alone
BENCHES=${BENCHES:-gpu train launch vla}
if [[ " $BENCHES " == *" launch "* ]]; then
  echo "== workstation launch (configs/launch/workstation.yaml, a simulated cue-reach robot, 10 episodes)"
  RUN=$(mktemp -d)
  polcache keys --dir "$RUN/keys" >/dev/null
  # A state-only robot renders nothing: MuJoCo is kept from loading EGL, which the GPU machine may lack.
  MUJOCO_GL=disable timeout 240 polcache launch configs/launch/workstation.yaml robot.enabled=true robot.episodes=10 \
    server.checkpoint=polcache/assets/checkpoints/cue-reach-ptp server.keys="$RUN/keys" run_dir="$RUN/run" \
    "robot.placement={cpus: [0], fifo_priority: 50}" server.device="$DEVICE" ${LAUNCH_ARGS:-} > "$RUN/launch.log" 2>&1 &
  LAUNCH=$!
  python - <<'PEEK'
import json, time, urllib.request
url, deadline, data = "http://127.0.0.1:8050/data.json", time.time() + 120, {}
def views_with_data(d):  # the page's views (plots) that have received points
    return [k for k, v in d.items() if isinstance(v, dict) and any(
        s.get("y") or s.get("counts") or s.get("values") for s in v.get("series", []))]
while time.time() < deadline and len(views_with_data(data)) < 2:  # until the robot's records arrive
    try:
        data = json.load(urllib.request.urlopen(url, timeout=5))
    except OSError:
        pass
    time.sleep(2)
time.sleep(5)
try:
    data = json.load(urllib.request.urlopen(url, timeout=5))
except OSError as exc:
    print("dashboard: the last read failed:", exc)
print("dashboard views with data:", views_with_data(data))
print("dashboard views without:", sorted(set(data) - set(views_with_data(data))))
PEEK
  wait $LAUNCH; echo "launch exit status $?"
  cat "$RUN/launch.log"
  tail -5 "$RUN"/run/*/server.log
  cp "$RUN"/run/*/robot.json "$OUT/launch_robot.json" 2>/dev/null
fi
cd benchmarks
if [[ " $BENCHES " == *" train "* ]]; then
  echo "== bench_train_step"
  timeout 120 python bench_train_step.py --device "$DEVICE" ${QUICK:+--quick} --json "$OUT/train_step.json"
fi
if [[ " $BENCHES " == *" gpu "* ]]; then
  echo "== bench_gpu"
  if [ -n "${QUICK:-}" ]; then
    timeout 300 python bench_gpu.py --device "$DEVICE" --quick --no-compile --json "$OUT/gpu.json"
  else
    timeout 360 python bench_gpu.py --device "$DEVICE" --no-compile --calls 20 --sustain 0.5 \
      ${EXECUTORS:+--executors "$EXECUTORS"} --json "$OUT/gpu.json"
  fi
fi
if [[ " $BENCHES " == *" fairness "* ]]; then  # phase-locked robots served batched on the GPU
  for n in 4 16; do
    echo "== bench_fairness, $n robots"
    timeout 150 python bench_fairness.py --device "$DEVICE" --robots $n --hz 50 --seconds ${QUICK:+1}${QUICK:-10} \
      --batches 1,$((n > 8 ? n : 8)) --json "$OUT/fairness_$n.json" 2>&1 | tail -4
  done
fi
if [[ " $BENCHES " == *" vla "* ]] && [ -d ../.gpu/vla ]; then
  echo "== bench_vla"
  timeout 120 python bench_vla.py --checkpoint ../.gpu/vla --schedule ../.gpu/vla_sched.json --device "$DEVICE" \
    --calls 30 --json "$OUT/vla_gpu.json"
fi
