"""Memory and time of `polcache data import-lerobot` (episode by episode) on synthetic LeRobot v3.0
roots of C cameras (default 2) at 480x640: N and 3N episodes of L frames, and N episodes of 3L
frames, each imported at full size and with `--image-size` (default 240x320 and 96x96). Every
import runs in its own process, which reports its tracemalloc peak (Python and numpy allocations,
after the imports of av, zarr and pyarrow), its peak RSS (VmHWM; `rss_start_MiB` is the same before
the import) and wall time. `peak_x` is the peak over the N x L root's at the same size: 3N episodes
should stay near 1 (memory follows an episode, not the dataset, once N x L fills the writer's
64-frame image chunk, which holds frames across episodes until it is full); 3L frames shows how it
grows with an episode's length.

The roots are written by polcache's own export (H.264 crf 23, one mp4 per camera, all episodes back
to back) from moving gradients under per-pixel noise (0-63 levels), so that the encoder and zarr meet
detail everywhere as in camera images; smooth synthetic images would make both unrealistically small.

    python benchmarks/bench_lerobot_import.py [--episodes 4] [--frames 40] [--cameras 2]
                                              [--sizes 240x320,96x96]
                                              [--json benchmarks/results/lerobot_import.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, print_table, write_json  # noqa: E402

from polcache.data import lerobot  # noqa: E402
from polcache.data.lerobot_export import export_lerobot  # noqa: E402
from polcache.data.store import Episode, dataset_writer  # noqa: E402

HEIGHT, WIDTH, CRF, FPS = 480, 640, 23, 50


def _rss_mib() -> float:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that across fork and exec,
    so a child started by this script would report the parent's RSS (its images and export) as its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark needs Linux)")


def child(root: str, out: str, size: str) -> None:
    """Import one root in this process and print its figures as one JSON line."""
    for module in ("av", "pyarrow", "zarr"):  # imported before the measurement: module imports are not measured
        importlib.import_module(module)
    image_size = None if size == "full" else tuple(map(int, size.split("x")))
    rss_start = _rss_mib()
    t0 = time.perf_counter()
    tracemalloc.start()
    lerobot.import_lerobot(root, out, progress=False, image_size=image_size)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"wall_s": time.perf_counter() - t0, "peak_MiB": peak / 2**20,
                      "rss_start_MiB": rss_start, "peak_rss_MiB": _rss_mib()}))


def make_root(work: Path, episodes: int, frames: int, cameras: int, seed: int) -> tuple[Path, float]:
    """A LeRobot root of `episodes` x `frames` x `cameras`, written through a polcache dataset; export seconds."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]

    def image(g: int, cam: int) -> np.ndarray:
        base = np.stack([(x + 3 * g) % 192, (y + 5 * g + 40 * cam) % 192, (x + y + g) % 192], -1)
        return (base + rng.integers(0, 64, (HEIGHT, WIDTH, 3))).astype(np.uint8)

    src, root = work / f"src_{episodes}x{frames}.zarr", work / f"root_{episodes}x{frames}"
    with dataset_writer(src, {"fps": FPS}) as writer:
        for e in range(episodes):
            g = e * frames
            obs = {f"image_cam{c}": np.stack([image(g + k, c) for k in range(frames)]) for c in range(cameras)}
            obs["state"] = rng.normal(size=(frames, 14)).astype(np.float32)
            writer.append(Episode(obs=obs, action=rng.normal(size=(frames, 14)).astype(np.float32), task="fold"))
    t0 = time.perf_counter()
    export_lerobot(src, root, crf=CRF, progress=False)
    return root, time.perf_counter() - t0


def _mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=4, help="N")
    ap.add_argument("--frames", type=int, default=40, help="L, frames per episode")
    ap.add_argument("--cameras", type=int, default=2, help="C")
    ap.add_argument("--sizes", default="240x320,96x96", help="--image-size values besides full size")
    ap.add_argument("--json", default=str(RESULTS / "lerobot_import.json"))
    ap.add_argument("--child", nargs=3, metavar=("ROOT", "OUT", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    n, length = args.episodes, args.frames
    shapes = [(n, length), (3 * n, length), (n, 3 * length)]
    sizes = ["full", *args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        roots = {}
        for seed, (eps, frames) in enumerate(shapes):
            roots[eps, frames], export_s = make_root(work, eps, frames, args.cameras, seed)
            print(f"root {eps} x {frames}: {_mib(roots[eps, frames]):.0f} MiB, exported in {export_s:.1f} s", flush=True)
        for size in sizes:
            h, w = (HEIGHT, WIDTH) if size == "full" else map(int, size.split("x"))
            for eps, frames in shapes:
                out = work / f"out_{eps}x{frames}_{size}.zarr"
                proc = subprocess.run([sys.executable, __file__, "--child", str(roots[eps, frames]), str(out), size],
                                      check=True, capture_output=True, text=True)
                m = json.loads(proc.stdout.splitlines()[-1])
                if (eps, frames) == (n, length):
                    base = m["peak_MiB"]
                rows.append({"episodes": eps, "frames": frames, "image": "480x640 (full)" if size == "full" else size,
                             "root_MiB": round(_mib(roots[eps, frames]), 1),
                             "episode_MiB": round(frames * args.cameras * h * w * 3 / 2**20, 1),
                             "dataset_MiB": round(eps * frames * args.cameras * h * w * 3 / 2**20, 1),
                             "peak_MiB": round(m["peak_MiB"], 1), "peak_x": round(m["peak_MiB"] / base, 2),
                             "rss_start_MiB": round(m["rss_start_MiB"]), "peak_rss_MiB": round(m["peak_rss_MiB"]),
                             "wall_s": round(m["wall_s"], 1)})
                print(f"imported {eps} x {frames} at {size}: {m['wall_s']:.1f} s", flush=True)
                shutil.rmtree(out)
    print_table(rows, list(rows[0]))
    write_json(args.json, {"benchmark": "lerobot_import", "episodes": n, "frames": length, "cameras": args.cameras,
                           "source": f"{HEIGHT}x{WIDTH}", "crf": CRF, "rows": rows})


if __name__ == "__main__":
    main()
