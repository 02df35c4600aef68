"""One exception family, so the CLI and the server can turn any user-facing problem
into one clear line instead of a traceback."""


def cut_short(text: str, head: int = 20, tail: int = 8) -> str:
    """`text` for a one-line message, cut short past head + tail + 12 characters: a 400-digit number
    or a long list is not worth printing whole."""
    return text if len(text) <= head + tail + 12 else f"{text[:head]}...{text[-tail:]} ({len(text)} characters)"


class PolcacheError(Exception):
    """A problem the user can fix: bad input, wrong file, mismatched shapes."""


class ConfigError(PolcacheError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


class CheckpointError(PolcacheError):
    """A checkpoint is missing, truncated, or does not fit the task it is used with."""


class DatasetError(PolcacheError):
    """A dataset is missing, truncated, or not written by polcache."""


class ObservationError(PolcacheError, ValueError):
    """Observations given to a backend that are not the policy's: a key missing, another dtype or
    shape, NaN. (A ValueError too, as PolicyBackend.predict documents.)"""


class InferenceError(PolcacheError, ValueError):
    """A chunk that must not reach a robot, e.g. NaN or infinite actions (from observations far outside
    the training data, or broken weights). A ValueError too, as PolicyBackend.predict documents."""


class TrainingError(PolcacheError):
    """Training that cannot go on usefully, e.g. a loss that became NaN or infinite."""


class UnknownTaskError(PolcacheError):
    """A task name that no registered simulation task answers to."""


class DeviceError(PolcacheError):
    """A compute device that this machine does not have (e.g. --device cuda without CUDA)."""


class PrecisionError(PolcacheError):
    """A reduced-precision denoiser whose actions disagree with fp32 beyond the stated tolerance."""


class ExportError(PolcacheError):
    """An exported policy artifact is missing, corrupt, tampered with, or used with settings
    (cache plan, sampler, steps) other than the ones it was exported with."""


class BackendUnavailableError(PolcacheError):
    """An inference backend that this installation cannot run (e.g. TensorRT without tensorrt)."""


class OutputError(PolcacheError):
    """An output path a command cannot write, or that holds something it must not replace."""


