"""Exported denoisers (imported as polcache.export): ONNX graphs with the cache plan inside, run by
ONNX Runtime (`OrtBackend`) or built into TensorRT engines (`TrtBackend`, where tensorrt exists).

    polcache export --checkpoint DIR [--cache SPEC] [--sampler K] [--steps K] --format onnx --out ART
    load_backend(ART)                  # -> OrtBackend
    load_backend(ART, backend="trt")   # -> TrtBackend (CUDA, tensorrt)

onnx and onnxruntime are optional (`pip install -e '.[export]'`) and imported lazily."""

from __future__ import annotations

from polcache.errors import ExportError
from polcache.extras import install_hint


def require_export_deps() -> None:
    """One clear line when onnx/onnxruntime are missing."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"ONNX export needs {' and '.join(missing)}: {install_hint('onnx')}")
