"""One exception family, so the CLI and the server can turn any user-facing problem
into one clear line instead of a traceback."""


class PolcacheError(Exception):
    """A problem the user can fix: bad input, wrong file, mismatched shapes."""


class ConfigError(PolcacheError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


class CheckpointError(PolcacheError):
    """A checkpoint is missing, truncated, or does not fit the task it is used with."""


class DatasetError(PolcacheError):
    """A dataset is missing, truncated, or not written by polcache."""


class UnknownTaskError(PolcacheError):
    """A task name that no registered simulation task answers to."""


class DeviceError(PolcacheError):
    """A compute device that this machine does not have (e.g. --device cuda without CUDA)."""
