#!/usr/bin/env bash
# Set up and run the whole suite (slow integration tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh sim,export,dev
# The dashboard's browser test loads the page in headless Chromium (skipped where it is missing).
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q chromium >/dev/null || echo "could not install chromium"
  elif sudo -n true 2>/dev/null; then sudo apt-get install -y -q chromium >/dev/null || echo "could not install chromium"
  fi
fi
export MUJOCO_GL="${MUJOCO_GL:-egl}"
python -m pytest -q "$@"
