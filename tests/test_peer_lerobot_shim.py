"""The torchvision stand-in of the LeRobot comparison (benchmarks/lerobot_venv) must refuse every use:
a finished benchmark run is the proof that LeRobot's state-only policy never ran torchvision code."""

import subprocess
import sys
from pathlib import Path

SHIM_ROOT = Path(__file__).parents[1] / "benchmarks" / "lerobot_venv"

# the imports LeRobot 0.4.4 and transformers do at module level, then every kind of use
PROBE = """
import torchvision
from torchvision import transforms
from torchvision.transforms import v2, InterpolationMode
from torchvision.transforms.v2 import Transform, functional as F
assert torchvision.IS_POLCACHE_SHIM and InterpolationMode.BILINEAR.name == "BILINEAR"

class Sub(Transform):  # LeRobot's datasets/transforms.py subclasses it at import time
    pass

uses = [lambda: Sub(), lambda: transforms.Resize(8), lambda: getattr(torchvision.models, "resnet18")(),
        lambda: F.resize(None, 8), lambda: torchvision.io.VideoReader("x.mp4", "video"),
        lambda: torchvision.set_video_backend("pyav"), lambda: v2.Identity()]
refused = 0
for use in uses:
    try:
        use()
    except torchvision.ShimCalled:
        refused += 1
print(refused, len(uses))
"""


def test_shim_imports_as_lerobot_needs_and_refuses_every_use():
    out = subprocess.run([sys.executable, "-c", PROBE], env={"PYTHONPATH": str(SHIM_ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    refused, total = map(int, out.stdout.split())
    assert refused == total == 7
