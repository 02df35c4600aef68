"""What a policy consumes and produces, independent of the backend that computes it.

The runtime (server, evaluator, simulated robot) talks only to `PolicyBackend`, so torch,
ONNX Runtime and TensorRT backends are interchangeable. Observations are dicts of arrays
keyed by name: `state` (float32 proprioception/low-dim state) and `image_<camera>`
(uint8 HxWx3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
import math
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from polcache.config import INSTRUCTION_KEY, MAX_SEED
from polcache.errors import InferenceError, ObservationError


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name, e.g. "float32", "uint8"

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict) -> "ArraySpec":
        return cls(tuple(int(s) for s in d["shape"]), str(d["dtype"]))


FRAME_MODES = ("strided", "mixed")
# An observation farther from the middle of its training range than this many times the range's
# half-width, and than this many of its own units, is a sensor fault or a unit mistake, not a state:
# refused before inference by every backend alike. (Such values gave saturated actions, or overflowed
# to NaN on one backend and not on another: 1e20 did on torch, not on ONNX Runtime.) The floor of as
# many units keeps a dimension that barely moved in training (an object's resting height) usable.
OBS_RANGE_LIMIT = 100.0


def check_seed(seed: Any) -> int | None:
    """A sampling seed as every backend takes it: None (fresh noise) or an integer in 0..2^63-1
    (torch's generator range). Anything else (a bool, a float, a string, a negative number) is
    refused rather than truncated, so `--backend ort` and `--backend torch` accept the same seeds."""
    if seed is None:
        return None
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)) or not 0 <= seed <= MAX_SEED:
        raise ObservationError(f"seed: expected an integer in 0..2^63-1 or None, got {seed!r}")
    return int(seed)


# A control rate this far (relative) from the policy's training rate (PolicySpec.control_hz) is another
# rate, not a rounding of it (a recorded dataset states 1 / period to 6 decimals).
RATE_TOLERANCE = 0.01


def check_control_hz(value: Any, field: str) -> float | None:
    """A training control rate as every reader takes it: None (unknown) or a positive finite number
    of Hz; anything else (a bool, a string, 0, NaN) raises ValueError naming `field`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{field}: expected a positive number of Hz (control steps per second) or null, got "
                         f"{value!r}")
    return float(value)


def rate_mismatch(policy_hz: float | None, hz: float) -> bool:
    """Whether `hz` is another rate than the policy's training rate (False where that is unknown)."""
    return policy_hz is not None and abs(hz - policy_hz) > RATE_TOLERANCE * policy_hz


def frame_offsets(n_obs_steps: int, stride: int = 1, mode: str = "strided") -> tuple[int, ...]:
    """Control steps of the observation frames relative to the current one, oldest first.
    "strided": K frames at stride s ending at the current step (0). "mixed": the newest
    ceil(K/2) frames dense (stride 1), the older floor(K/2) at stride s before them."""
    if mode == "strided":
        return tuple(-(n_obs_steps - 1 - j) * stride for j in range(n_obs_steps))
    if mode != "mixed":
        raise ValueError(f"frame mode {mode!r}: expected one of {', '.join(FRAME_MODES)}")
    dense = n_obs_steps - n_obs_steps // 2
    older = tuple(-(dense - 1) - stride * i for i in range(n_obs_steps // 2, 0, -1))
    return older + tuple(range(-(dense - 1), 1))


def action_offsets(n_obs_steps: int, horizon: int, stride: int = 1, mode: str = "strided") -> tuple[int, ...]:
    """Control steps of the H action tokens relative to the current one: the K-1 past actions at
    the observation frames' steps (token i pairs with frame i), then the current action and
    dense future ones. Past-token prediction supervises tokens 0..K-2 too."""
    return frame_offsets(n_obs_steps, stride, mode)[:-1] + tuple(range(horizon - n_obs_steps + 1))


PLACEHOLDER_INSTRUCTION = "go"  # what warm-ups and timing runs instruct a language policy (fits any width)


def _check_instructions(a: np.ndarray) -> None:
    """Every frame's instruction as encode_instruction writes one: UTF-8 text, then zero padding. In
    process, an empty, garbled or NUL-split one ran (every robot's is checked as text at the server)."""
    for i, row in enumerate(a.reshape(-1, a.shape[-1])):
        raw = row.tobytes().rstrip(b"\0")
        why = ("empty (all zero bytes)" if not raw else "a zero byte inside the text" if b"\0" in raw else None)
        if why is None:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                why = f"not valid UTF-8 (byte {exc.start})"
        if why is not None:
            b, t = divmod(i, a.shape[1])
            raise ObservationError(f"observation {INSTRUCTION_KEY!r} [{b}, {t}]: {why}; expected text's UTF-8 bytes, "
                                   f"zero-padded (polcache.policy.language.encode_instruction)")


@dataclass(frozen=True)
class PolicySpec:
    """Shapes and timing of one policy: one observation per control step in, a chunk out."""

    obs: dict[str, ArraySpec]  # per single time step, no batch or history axis
    action_dim: int
    n_obs_steps: int  # observation history the policy conditions on
    horizon: int  # predicted action tokens
    n_action_steps: int  # actions executed per chunk, starting at the current step
    task: str = ""
    obs_stride: int = 1  # control steps between consecutive observation frames
    frame_mode: str = "strided"  # or "mixed": see frame_offsets
    # key -> (scale, offset) per last dimension: what the policy sees is x * scale + offset (its
    # normaliser); keys listed are checked against OBS_RANGE_LIMIT. Empty for policies from before it.
    obs_normalizer: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = field(default_factory=dict)
    # Control steps per second of the data it was trained on (the dataset's fps): its actions are per
    # step at that rate. None where unknown (a dataset without fps, a policy from before it).
    control_hz: float | None = None

    def check_observations(self, obs: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int]:
        """Every backend's one check of what `predict` is given: obs[key] of shape (batch,
        n_obs_steps, *shape), finite, same batch for every key -> contiguous arrays of the spec's
        dtypes and the batch size. Keys the policy does not take are ignored. State of another
        numeric dtype is cast; pixels must be uint8 (a [0, 1] float image would read as black).
        Anything else raises ObservationError naming the key and what was expected."""
        if not isinstance(obs, Mapping):
            raise ObservationError(f"observations: expected a dict of key -> array, got {type(obs).__name__}")
        arrays, batch = {}, None
        for key, s in self.obs.items():
            if key not in obs:
                raise ObservationError(f"observation {key!r} missing (the policy takes {sorted(self.obs)})")
            a = np.asarray(obs[key])
            want = np.dtype(s.dtype)
            if a.dtype != want and (want == np.uint8 or a.dtype.kind not in "fiu"):
                holds = "pixels 0-255" if key.startswith("image") else "UTF-8 bytes, zero-padded"  # or an instruction
                raise ObservationError(f"observation {key!r}: expected {want.name}, got {a.dtype.name}"
                                       + (f" ({holds})" if want == np.uint8 else ""))
            shape = (self.n_obs_steps, *s.shape)
            if a.ndim != len(shape) + 1 or a.shape[1:] != shape or a.shape[0] < 1:
                raise ObservationError(f"observation {key!r}: expected shape (batch, {', '.join(map(str, shape))}) "
                                       f"with batch >= 1, got {a.shape}")
            if batch is not None and a.shape[0] != batch:
                raise ObservationError(f"observation {key!r} has batch {a.shape[0]}, the others {batch}")
            batch = a.shape[0]
            a = np.ascontiguousarray(a, dtype=want)
            if want.kind == "f" and not np.isfinite(a).all():
                raise ObservationError(f"observation {key!r} contains NaN or infinite values")
            if key in self._normalizers:
                self._check_range(key, a)
            if key == INSTRUCTION_KEY:
                _check_instructions(a)
            arrays[key] = a
        return arrays, int(batch)

    def placeholder_observations(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Observations of the spec's shapes for warm-ups and timing runs: zeros, and a written
        instruction where the policy reads one (zero bytes are no instruction)."""
        from polcache.policy.language import encode_instruction

        obs = {key: np.zeros((batch, self.n_obs_steps, *s.shape), dtype=s.dtype) for key, s in self.obs.items()}
        if INSTRUCTION_KEY in obs:
            obs[INSTRUCTION_KEY][:] = encode_instruction(PLACEHOLDER_INSTRUCTION, self.obs[INSTRUCTION_KEY].shape[0])
        return obs

    @cached_property
    def _normalizers(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """key -> scale, offset and the largest |x * scale + offset| allowed, per dimension."""
        out = {}
        for key, (scale, offset) in self.obs_normalizer.items():
            scale = np.asarray(scale, np.float64)
            out[key] = scale, np.asarray(offset, np.float64), OBS_RANGE_LIMIT * np.maximum(1.0, np.abs(scale))
        return out

    def _check_range(self, key: str, a: np.ndarray) -> None:
        """ObservationError where a value of `a` lies beyond OBS_RANGE_LIMIT (see there)."""
        scale, offset, limit = self._normalizers[key]
        over = np.abs(a * scale + offset) / limit  # float64: a float32 state of 1e38 must not overflow here
        if over.max() <= 1.0:
            return
        index = np.unravel_index(int(over.argmax()), over.shape)
        dim = index[-1]
        low, high = sorted(((-1 - offset[dim]) / scale[dim], (1 - offset[dim]) / scale[dim]))
        reach = OBS_RANGE_LIMIT * max((high - low) / 2, 1.0)
        raise ObservationError(f"observation {key!r}[{dim}] is {a[index]:.6g}: the policy was trained on {low:.4g} to "
                               f"{high:.4g} there and takes values at most {reach:.4g} from the middle of that "
                               f"({OBS_RANGE_LIMIT:g} times its half-width, or {OBS_RANGE_LIMIT:g} units): a sensor "
                               f"fault or a unit mistake, not answered")

    @property
    def frame_offsets(self) -> tuple[int, ...]:
        return frame_offsets(self.n_obs_steps, self.obs_stride, self.frame_mode)

    @property
    def history_span(self) -> int:
        """Control steps of history a window covers, current step included."""
        return 1 - self.frame_offsets[0]

    def to_dict(self) -> dict:
        return {
            "obs": {k: v.to_dict() for k, v in self.obs.items()},
            "action_dim": self.action_dim,
            "n_obs_steps": self.n_obs_steps,
            "horizon": self.horizon,
            "n_action_steps": self.n_action_steps,
            "task": self.task,
            "obs_stride": self.obs_stride,
            "frame_mode": self.frame_mode,
            "obs_normalizer": {k: {"scale": list(scale), "offset": list(offset)}
                               for k, (scale, offset) in self.obs_normalizer.items()},
            "control_hz": self.control_hz,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PolicySpec":
        return cls(
            obs={k: ArraySpec.from_dict(v) for k, v in d["obs"].items()},
            action_dim=int(d["action_dim"]),
            n_obs_steps=int(d["n_obs_steps"]),
            horizon=int(d["horizon"]),
            n_action_steps=int(d["n_action_steps"]),
            task=str(d.get("task", "")),
            obs_stride=int(d.get("obs_stride", 1)),
            frame_mode=str(d.get("frame_mode", "strided")),
            obs_normalizer={k: (tuple(map(float, v["scale"])), tuple(map(float, v["offset"])))
                            for k, v in d.get("obs_normalizer", {}).items()},
            control_hz=check_control_hz(d.get("control_hz"), "control_hz"),
        )


@dataclass(frozen=True)
class CommittedActions:
    """Real-time chunking's input for the next chunk: the actions already planned for the steps it
    covers (row 0 due at the newest observation's step, unnormalised) and `delay`, how many of them
    execute before the chunk can arrive (held exactly; the rest of the overlap guides it with a
    decaying weight). See polcache.policy.rtc."""

    actions: np.ndarray  # (n, action_dim)
    delay: int


NON_FINITE_ACTIONS = ("the policy's actions are NaN or infinite: its observations are probably far outside what it "
                      "was trained on (check their units and scale), or its weights are broken")


def finite_actions(actions: np.ndarray) -> np.ndarray:
    """`actions` where every value is finite; else InferenceError, so no backend hands a robot a NaN."""
    if not np.isfinite(actions).all():
        raise InferenceError(NON_FINITE_ACTIONS)
    return actions


class PolicyBackend(Protocol):
    """Anything that turns a batch of observation histories into action chunks."""

    spec: PolicySpec

    def predict(self, obs: dict[str, np.ndarray], seed: int | None = None,
                past_actions: np.ndarray | None = None, committed: CommittedActions | None = None) -> np.ndarray:
        """obs[key]: (B, n_obs_steps, *spec.obs[key].shape) -> actions (B, n_action_steps, action_dim),
        unnormalised, float32; actions[:, 0] is due at the newest observation's step.
        `past_actions` (n_obs_steps - 1, action_dim): the actions the robot executed at the past
        frames' steps (spec.frame_offsets[:-1]), NaN rows where none was (before the episode began,
        a tick without an action); a backend that self-verifies scores its candidates against the
        known rows, others ignore them. `committed` (batch 1): generate the chunk by real-time
        chunking toward those actions; a backend that cannot raises ValueError."""
        ...

    def describe(self) -> dict:
        """What runs, for reports (JSON-able): backend kind, device, sampler kind and `steps`,
        and `cache` (the cache plan's summary, None when uncached)."""
        ...

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run one chunk per batch size before serving, so the first robot request pays no
        one-time cost (CUDA graph capture, engine or session initialisation)."""
        ...

    def session(self) -> "PolicySession":
        """Per-robot state for one connection: the server opens one per robot and resets it at
        each new epoch, the evaluator one per run; robots never share history."""
        ...


@runtime_checkable
class ChunkingBackend(Protocol):
    """A backend that may generate chunks by real-time chunking (polcache.policy.rtc): `predict`'s
    `committed` guides the chunk toward the actions still due from the last one."""

    rtc_blocker: str | None  # why it cannot (its sampler, its other options), or None


RTC_NEEDS = "real-time chunking needs the torch backend and a flow sampler"  # its guidance differentiates the steps


def chunking_blocker(backend: PolicyBackend) -> str | None:
    """Why `backend` cannot generate chunks by real-time chunking, or None where it can."""
    if not isinstance(backend, ChunkingBackend):
        return f"{RTC_NEEDS}, this is {type(backend).__name__}"
    return backend.rtc_blocker


class PolicySession(Protocol):
    """One robot's view of a backend: `predict` takes the window's observation steps too, so a
    session can keep per-frame work (e.g. encoder embeddings) from one chunk to the next."""

    def predict(self, obs: dict[str, np.ndarray], seqs: Sequence[int], seed: int | None = None,
                past_actions: np.ndarray | None = None, committed: CommittedActions | None = None) -> np.ndarray:
        """As PolicyBackend.predict for one robot (batch 1); `seqs[i]` is the control step of
        frame i (oldest first; padding repeats a step)."""
        ...

    def reset(self) -> None:
        """A new episode: forget everything of the last one."""
        ...


class StatelessSession:
    """The session of a backend that keeps nothing between chunks (an exported one): an episode's
    start has nothing to forget."""

    def __init__(self, backend: PolicyBackend):
        self.backend = backend

    def predict(self, obs: dict[str, np.ndarray], seqs: Sequence[int], seed: int | None = None,
                past_actions: np.ndarray | None = None, committed: CommittedActions | None = None) -> np.ndarray:
        if committed is None:  # not passed: a backend written without real-time chunking takes no `committed`
            return self.backend.predict(obs, seed=seed, past_actions=past_actions)
        return self.backend.predict(obs, seed=seed, past_actions=past_actions, committed=committed)

    def reset(self) -> None:
        pass
