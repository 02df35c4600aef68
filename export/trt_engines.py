"""TensorRT engines of an exported policy, cached on disk and refused or rebuilt when stale.

An engine is only valid for the graph it was built from, the precision it was built for, the
TensorRT version that built it and the GPU architecture it was tuned on. Each engine file
`engines/<graph>-<precision>-<gpu>-trt<version>.engine` has a sidecar JSON holding that key; a
missing, unreadable or mismatched sidecar means the engine is stale or foreign, and it is
rebuilt (or, with `rebuild=False`, refused) with the reason said. The key logic here needs no
TensorRT, so it is tested everywhere; building and running engines lives in trt_backend.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from polcache.atomic import atomic_write_bytes

ENGINE_DIR = "engines"
PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class EngineKey:
    graph: str  # graph name in the manifest ("encoder", "step", ...)
    graph_sha256: str  # the ONNX graph the engine was built from
    precision: str  # fp32 | fp16
    gpu: str  # device name, e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # e.g. "9.0"
    tensorrt: str  # TensorRT version that built it
    max_batch: int  # upper end of the optimisation profile

    @property
    def stem(self) -> str:
        gpu = "sm" + self.compute_capability.replace(".", "")
        return f"{self.graph}-{self.precision}-{gpu}-trt{self.tensorrt}"


def stale_reason(stored: dict | None, wanted: EngineKey) -> str | None:
    """Why an engine whose sidecar says `stored` cannot serve `wanted` (None: it can)."""
    if stored is None:
        return "no readable key file beside it (foreign or interrupted build)"
    have = asdict(wanted)
    diffs = [f"{name} {stored.get(name)!r} (need {value!r})" for name, value in have.items()
             if name != "max_batch" and stored.get(name) != value]
    if not isinstance(stored.get("max_batch"), int) or stored["max_batch"] < wanted.max_batch:
        diffs.append(f"max_batch {stored.get('max_batch')!r} (need >= {wanted.max_batch})")
    return "built for " + ", ".join(diffs) if diffs else None


def engine_paths(artifact: str | Path, key: EngineKey) -> tuple[Path, Path]:
    folder = Path(artifact) / ENGINE_DIR
    return folder / f"{key.stem}.engine", folder / f"{key.stem}.json"


def read_key(sidecar: Path) -> dict | None:
    try:
        doc = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def save_engine(artifact: str | Path, key: EngineKey, engine: bytes) -> Path:
    """Engine first, key second (both atomic): a key never vouches for a half-written engine."""
    path, sidecar = engine_paths(artifact, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, engine)
    atomic_write_bytes(sidecar, (json.dumps(asdict(key), indent=1) + "\n").encode())
    return path
