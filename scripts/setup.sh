#!/usr/bin/env bash
# Install polcache with the given extras (e.g. "sim" or "sim,export,dev"). torch==2.13.0 goes first:
# it is the CPU build on local disk here, and any range it satisfies would otherwise pull CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_ROOT_USER_ACTION=ignore
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[${1:?usage: scripts/setup.sh EXTRAS}]"
