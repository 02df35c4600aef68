#!/usr/bin/env bash
# Install polcache with the given extras (e.g. "sim" or "sim,export,dev"). torch goes first, and
# only where no torch in polcache's range (>=2.4,<2.14) is installed: a GPU workstation keeps its
# CUDA build. torch==2.13.0 is the CPU build on this project's machines (a local wheel); on a
# machine that reaches the public index, whose Linux torch wheel is the multi-GB CUDA build, set
# POLCACHE_TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_ROOT_USER_ACTION=ignore
if ! python -c "import sys, torch; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); \
sys.exit(not (2, 4) <= v < (2, 14))" 2>/dev/null; then
  python -m pip install -q torch==2.13.0 ${POLCACHE_TORCH_INDEX:+--index-url "$POLCACHE_TORCH_INDEX"}
fi
python -m pip install -q -e ".[${1:?usage: scripts/setup.sh EXTRAS}]"
