"""LeRobot v3.0 round trip on recorded camera demonstrations: export time, import time, sizes and
how close the images come back (H.264 yuv420p), state/action exactness.

    python benchmarks/bench_lerobot.py [--task reach-v3] [--episodes 5] [--size 96] [--crf 10]"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("MUJOCO_GL", "egl")

from common import RESULTS, print_table, write_json  # noqa: E402

from polcache.data import EpisodeStore  # noqa: E402
from polcache.data.lerobot import import_lerobot  # noqa: E402
from polcache.data.lerobot_export import export_lerobot  # noqa: E402
from polcache.envs import record_demonstrations  # noqa: E402


def _mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="reach-v3")
    ap.add_argument("--episodes", type=int, default=5)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--crf", type=int, default=10)
    ap.add_argument("--json", default=str(RESULTS / "lerobot.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, root, back = Path(tmp) / "src.zarr", Path(tmp) / "lerobot", Path(tmp) / "back.zarr"
        record_demonstrations(args.task, args.episodes, src, image=True, image_size=args.size, progress=False)
        t0 = time.perf_counter()
        export_lerobot(src, root, crf=args.crf, progress=False)
        t1 = time.perf_counter()
        import_lerobot(root, back, progress=False)
        t2 = time.perf_counter()
        a, b = EpisodeStore.open(src), EpisodeStore.open(back)
        key = next(k for k in a.obs_keys if k.startswith("image_"))
        err = np.abs(a.array(key).astype(int) - b.array(key).astype(int))
        row = {"task": args.task, "frames": a.num_steps, "image": f"{args.size}x{args.size}", "crf": args.crf,
               "export_s": round(t1 - t0, 2), "import_s": round(t2 - t1, 2),
               "zarr_MB": round(_mb(src), 2), "lerobot_MB": round(_mb(root), 2),
               "img_err_mean": round(float(err.mean()), 2), "img_err_p99": int(np.percentile(err, 99)),
               "img_err_max": int(err.max()),
               "state_action_exact": bool(np.array_equal(a.array("state"), b.array("state"))
                                          and np.array_equal(a.array("action"), b.array("action")))}
    print_table([row], list(row))
    write_json(args.json, {"benchmark": "lerobot_round_trip", "rows": [row]})


if __name__ == "__main__":
    main()
