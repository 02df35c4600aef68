#!/bin/bash
# Everything this project checks on a lent GPU machine, in one call (GPU time is minutes):
# the CUDA tests, then bench_gpu.py (DP-T chunks: eager, graphs, fused kernels, bf16, BAC) and
# bench_vla.py on the GPU. Tables print; JSON is written to $OUT (default benchmarks/results).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh   # this script's own smoke test on a CPU
#   BENCHES=vla bash benchmarks/gpu_check.sh     # the CUDA tests and bench_vla only (default: "gpu vla")
#
# The GPU machine has torch + CUDA but no registry: wheels of what it lacks (zarr, numcodecs,
# donfig, google-crc32c, pyzmq, diffusers, importlib_metadata, cp312) are carried in .whl/.
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

echo "== CUDA tests"
timeout 300 python -m pytest -q -rfEs -p no:cacheprovider tests/test_residual_norm.py tests/test_backend_speed_paths.py \
  tests/test_device.py tests/test_trt.py 2>&1 | tail -25

echo "== dashboard GPU load sample (nvidia-smi)"
python -c "from polcache.dashboard.system import SystemSampler; print('gpu utilisation %:', SystemSampler().sample_gpu())"

[ -n "${TESTS_ONLY:-}" ] && exit 0  # the CUDA tests alone
BENCHES=${BENCHES:-gpu vla}
cd benchmarks
if [[ " $BENCHES " == *" gpu "* ]]; then
  echo "== bench_gpu"
  if [ -n "${QUICK:-}" ]; then
    timeout 300 python bench_gpu.py --device "$DEVICE" --quick --no-compile --json "$OUT/gpu.json"
  else
    timeout 360 python bench_gpu.py --device "$DEVICE" --no-compile --calls 20 --sustain 0.5 --json "$OUT/gpu.json"
  fi
fi
if [[ " $BENCHES " == *" vla "* ]] && [ -d ../.gpu/vla ]; then
  echo "== bench_vla"
  timeout 120 python bench_vla.py --checkpoint ../.gpu/vla --schedule ../.gpu/vla_sched.json --device "$DEVICE" \
    --calls 30 --json "$OUT/vla_gpu.json"
fi
