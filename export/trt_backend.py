"""TrtBackend: an exported policy as TensorRT engines, behind the `PolicyBackend` interface.

The engines are built with the `tensorrt` Python API from the artifact's own ONNX graphs (the
encoder, and the single step graph whose If nodes run the cache plan), fp32 or fp16, with one
optimisation profile covering batch 1..max_batch and a timing cache kept beside the engines.
Engines are cached on disk per graph, precision, GPU architecture and TensorRT version (see
trt_engines.py); a stale or foreign one is rebuilt with the reason logged, or refused when
rebuilding is turned off. An fp16 engine must agree with the fp32 engine of the same artifact
within the parity tolerance on probe observations before it serves.

TensorRT is not on the package registry these machines reach: the import is guarded and its
absence is one line (`BackendUnavailableError`). Buffers are torch CUDA tensors, so no other
CUDA binding is needed. Per chunk: one encoder execution and K step executions on one stream.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from polcache.atomic import atomic_write_bytes
from polcache.errors import BackendUnavailableError, DeviceError, ExportError
from polcache.export.artifact import ExportedBackend
from polcache.export.manifest import graph_bytes
from polcache.export.trt_engines import PRECISIONS, EngineKey, engine_paths, read_key, save_engine, stale_reason

log = logging.getLogger(__name__)
TIMING_CACHE = "timing.cache"
WORKSPACE_BYTES = 1 << 30


def require_tensorrt():
    """The tensorrt module, or one line saying it is missing and what to do."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(
            "TensorRT backend: the tensorrt Python package is not installed (JetPack ships it on a Jetson; on a "
            "desktop GPU see the README's TensorRT section; it runs an artifact from `polcache export`, as --backend "
            "ort does); use --backend torch on a checkpoint, --backend ort on an artifact") from None
    return tensorrt


def build_engine(trt, onnx_bytes: bytes, inputs: list[dict], precision: str, max_batch: int, timing_cache: Path,
                 logger) -> bytes:
    """Serialized engine for one ONNX graph; batch dimensions ("B") get the profile 1..max_batch."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for spec in inputs:
        if "B" in spec["shape"]:
            def at(b: int) -> tuple[int, ...]:
                return tuple(b if d == "B" else int(d) for d in spec["shape"])
            profile.set_shape(spec["name"], at(1), at(1), at(max_batch))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT could not build an engine for the graph (see its log above)")
    atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


class TrtBackend(ExportedBackend):
    """Runs an artifact from `polcache export` as TensorRT engines on one CUDA GPU."""

    kind = "trt"

    def __init__(self, artifact: str | Path, device: str = "cuda", precision: str = "fp32", max_batch: int = 8,
                 rebuild: bool = True, precision_tolerance: float | None = None):
        """`rebuild`: build a missing, stale or foreign engine (else refuse it); `precision_tolerance`:
        the parity gate of an fp16 engine against the fp32 one (default polcache.policy.precision's)."""
        trt = require_tensorrt()
        import torch

        from polcache.policy.device import resolve_device
        from polcache.policy.parity import DEFAULT_TOLERANCE, check_parity

        super().__init__(artifact)
        if precision not in PRECISIONS:
            raise ExportError(f"TensorRT precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.torch = torch
        self.dev = resolve_device(device)
        if self.dev.type != "cuda":
            raise DeviceError("--backend trt runs on a CUDA GPU: pass --device cuda")
        if self.manifest.step_mode != "if":
            raise ExportError(f"{artifact}: TensorRT engines are built from the single step graph; export again "
                              "without --step-graphs patterns")
        self.precision, self.max_batch, self.rebuild = precision, int(max_batch), rebuild
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.trt = trt
        self.stream = torch.cuda.Stream(self.dev)
        self.engines = {name: self._engine(name, precision) for name in ("encoder", "step")}
        self.contexts = {name: e.create_execution_context() for name, e in self.engines.items()}
        self.parity = None
        if precision != "fp32":
            reference = TrtBackend(artifact, device, "fp32", max_batch, rebuild)
            self.parity = self.deviation_from(reference)
            check_parity(self.parity, f"TensorRT {precision} denoiser",
                         DEFAULT_TOLERANCE if precision_tolerance is None else precision_tolerance)

    # ---- engines -------------------------------------------------------------------------------
    def _key(self, name: str, precision: str) -> EngineKey:
        props = self.torch.cuda.get_device_properties(self.dev)
        return EngineKey(graph=name, graph_sha256=self.manifest.graphs[name].sha256, precision=precision,
                         gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                         tensorrt=self.trt.__version__, max_batch=self.max_batch)

    def _engine(self, name: str, precision: str):
        key = self._key(name, precision)
        path, sidecar = engine_paths(self.artifact, key)
        if path.is_file():
            reason = stale_reason(read_key(sidecar), key)
            if reason is None:
                engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
                if engine is not None:
                    return engine
                reason = "TensorRT could not deserialize it"
            if not self.rebuild:
                raise ExportError(f"{path}: engine {reason}; delete it or allow rebuilding")
            log.warning("%s: rebuilding the engine: %s", path, reason)
        onnx_bytes = graph_bytes(self.artifact, self.manifest, name)
        data = build_engine(self.trt, onnx_bytes, self.manifest.graphs[name].inputs, precision, self.max_batch,
                            path.parent / TIMING_CACHE, self.logger)
        save_engine(self.artifact, key, data)
        return self.runtime.deserialize_cuda_engine(data)

    # ---- execution ------------------------------------------------------------------------------
    def _tensor(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.dev, non_blocking=False)

    def _execute(self, name: str, tensors: dict) -> None:
        ctx = self.contexts[name]
        for tname, t in tensors.items():
            if self.engines[name].get_tensor_mode(tname) == self.trt.TensorIOMode.INPUT:
                ctx.set_input_shape(tname, tuple(t.shape))
            ctx.set_tensor_address(tname, t.data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise ExportError(f"TensorRT failed to execute the {name} engine")

    def sample(self, obs: dict[str, np.ndarray], x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        torch = self.torch
        feeds, B = self.spec.check_observations(obs)
        x, noise = self.check_start(B, x, noise)
        if B > self.max_batch:  # beyond the engines' optimisation profile: TensorRT's own error names no remedy
            raise ExportError(f"{B} observations in one call: these TensorRT engines take at most {self.max_batch} "
                              f"(max_batch); load the backend with a larger max_batch (polcache serve --max-batch)")
        H, Da, n, W = self.spec.horizon, self.spec.action_dim, self.n_blocks, self.width
        with torch.cuda.stream(self.stream):
            enc = {key: self._tensor(a) for key, a in feeds.items()}
            enc["obs_kv"] = torch.empty(self.shape_of("encoder", "obs_kv", B), device=self.dev)
            self._execute("encoder", enc)
            xs = [self._tensor(x), torch.empty((B, H, Da), device=self.dev)]
            ds = [torch.zeros((n, B, H, W), device=self.dev), torch.empty((n, B, H, W), device=self.dev)]
            noise_t = self._tensor(noise) if noise is not None else torch.zeros((self.K, B, H, Da), device=self.dev)
            ks = [torch.tensor(k, dtype=torch.int64, device=self.dev) for k in range(self.K)]
            for k in range(self.K):
                cur, nxt = k % 2, 1 - k % 2
                self._execute("step", {"x": xs[cur], "k": ks[k], "obs_kv": enc["obs_kv"], "deltas": ds[cur],
                                       "noise": noise_t[k], "x_next": xs[nxt], "deltas_out": ds[nxt]})
            out = xs[self.K % 2].cpu().numpy()
        return out

    def describe(self) -> dict:
        return {**super().describe(), "device": str(self.dev), "precision": self.precision,
                "tensorrt": self.trt.__version__, "max_batch": self.max_batch, "parity": self.parity}
