"""The one parity gate: reduced-precision denoisers, TensorRT engines and exported graphs must
sample the same normalised action chunks as the fp32 torch policy they came from, compared on
probe observations with the same noise, before they serve or are written. Needs no torch.

The gate judges the median probe, not the worst. Rounding differences (float32 in another
library, bf16) are amplified by the sampler's chain on some inputs: an honest ONNX export of the
shipped image policy differs from torch by 0.007 on the median random-pixel probe and by up to
0.13 on one probe in 32, and torch itself moves 0.05 when its weights change by 1e-7. A broken
graph or engine (a cosine of -0.55 has been seen) is wrong on every probe. The worst probe and
the smallest cosine are reported alongside."""

from __future__ import annotations

import math

import numpy as np

from polcache.errors import PolcacheError, PrecisionError

DEFAULT_TOLERANCE = 0.05  # median probe's max |action difference| in normalised units (actions span [-1, 1])
PROBES = 8


def chunk_deviation(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How far two batches of normalised chunks (probes, horizon, action_dim) are apart: the
    median and largest over probes of each probe's max |difference|, and the smallest cosine."""
    probes = len(reference)
    a = np.asarray(reference, np.float64).reshape(probes, -1)
    b = np.asarray(candidate, np.float64).reshape(probes, -1)
    per_probe = np.abs(a - b).max(1)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"median_abs": float(np.median(per_probe)), "max_abs": float(per_probe.max()),
            "min_cosine": float(cos.min()), "probes": probes}


def check_parity(deviation: dict, candidate: str, tolerance: float, reference: str = "fp32",
                 remedy: str = "run fp32 or raise the tolerance (--precision-tolerance) knowingly",
                 error: type[PolcacheError] = PrecisionError) -> None:
    """Refuse `candidate` when its median probe differs from `reference` by more than `tolerance`
    (or anything is NaN)."""
    if not deviation["median_abs"] <= tolerance or math.isnan(deviation["max_abs"]):  # NaN on any probe
        raise error(
            f"{candidate} disagrees with {reference} by {deviation['median_abs']:.4g} on the median of "
            f"{deviation['probes']} probe observations (normalised action units; worst probe "
            f"{deviation['max_abs']:.4g}, min cosine {deviation['min_cosine']:.3f}), above the tolerance "
            f"{tolerance:g}: {remedy}")
