"""The robot package installs alone: no torch, no MuJoCo, nothing else from polcache."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys, pkgutil, importlib
sys.modules['torch'] = None
sys.modules['mujoco'] = None
import polcache_client
for info in pkgutil.iter_modules(polcache_client.__path__):
    importlib.import_module('polcache_client.' + info.name)
outside = sorted(m for m in sys.modules if m == 'polcache' or m.startswith('polcache.'))
assert not outside, outside
print('ok')
"""


def test_client_imports_without_torch_or_the_rest_of_polcache():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


SERVER_CHECK = """
import sys
sys.modules['mujoco'] = None
sys.modules['metaworld'] = None
from polcache.cli import build_parser, main
build_parser()
assert 'mujoco' not in [m for m in sys.modules if sys.modules[m] is not None]
print('ok')
"""


def test_the_policy_commands_start_without_the_sim_extra():
    """A robot workstation installs polcache without MuJoCo: `polcache serve/export/...` must start."""
    result = subprocess.run([sys.executable, "-c", SERVER_CHECK], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"

