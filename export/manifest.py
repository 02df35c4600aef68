"""The manifest of an exported policy: what the artifact holds, and the checks that refuse a bad one.

An artifact is one directory, written atomically:

    manifest.json       this file's content (format, version, graphs with sha256 and I/O, policy
                        spec, sampler tables, normaliser tables, cache plan, model identity)
    encoder.onnx        observation history -> cross-attention keys/values of the observation tokens
    step.onnx           one denoising step with the plan inside (step mode "if"), or
    step_p<j>.onnx      one graph per distinct update pattern of the plan (step mode "patterns")

Reading needs neither torch nor onnx: only json, hashlib and numpy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from polcache.atomic import restore
from polcache.digest import file_sha256
from polcache.cache.errors import CacheError
from polcache.cache.schedule_keys import check_schedule_keys
from polcache.cache.spec import CacheSpec, parse_cache_spec
from polcache.errors import ExportError
from polcache.jsonfile import read_json_object
from polcache.policy.spec import PolicySpec

FORMAT = "polcache-export"
VERSION = 2  # 2: sealed (a manifest of version 1 was written before seals, or sealed without saying so)
UNSEALED_VERSION = 1  # still read where sealed; without a seal refused (a version lowered to 1 turned the check off)
MANIFEST = "manifest.json"


def sha256_file(path: str | Path) -> str:
    """A file's digest as a manifest records it: "sha256:" and its hex digits."""
    return "sha256:" + file_sha256(path)


@dataclass
class GraphEntry:
    file: str
    sha256: str
    inputs: list[dict]  # {"name", "shape" (ints and "B" for the batch), "dtype"}
    outputs: list[dict]
    opset: int


@dataclass
class Manifest:
    spec: dict  # PolicySpec.to_dict()
    model: dict  # {"hash": model_hash(policy) (config, shapes, weights, normaliser), "checkpoint", dims...}
    sampler: dict  # {"kind", "steps", "timesteps", "a".."s", "clip_sample", "needs_noise"}
    cache: dict  # {"spec", "schedule_sha256", "summary", "table" (K x n_blocks, 1 = compute)}
    normalizer: dict  # {"action": {"scale", "offset"}}: the decode of normalised samples
    graphs: dict[str, GraphEntry]
    step_mode: str = "if"  # "if": graph "step"; "patterns": graphs "step_p<j>", chosen by `pattern_of_step`
    pattern_of_step: list[int] = field(default_factory=list)
    format: str = FORMAT
    version: int = VERSION
    polcache_version: str = ""
    created: str = ""
    export_seconds: float = 0.0
    # the sha256 of every other field (`content_sha256`), written at export: the graphs were built for these
    # values, so a manifest edited afterwards (a scale, a stride, a plan, a graph's hash) is refused at load
    # rather than run with actions silently different. Empty in manifests from before it.
    seal: str = ""

    @property
    def policy_spec(self) -> PolicySpec:
        return PolicySpec.from_dict(self.spec)

    def sealed_json(self) -> str:
        """The file's text, with the seal of the fields as they are now (set on this manifest too)."""
        self.seal = content_sha256(asdict(self))
        return json.dumps(asdict(self), indent=1) + "\n"


def content_sha256(doc: dict) -> str:
    """The sha256 of a manifest's fields but its seal, in one canonical JSON form (what a reader
    computes from the parsed file is what the writer computed from the values it wrote)."""
    content = {k: v for k, v in doc.items() if k != "seal"}
    return "sha256:" + hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


JSON_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
              type(None): "null"}


def json_type(value: object) -> str:
    """What a JSON value is called in JSON's words (a manifest is edited as JSON, not Python)."""
    return JSON_NAMES.get(type(value), type(value).__name__)


def _check_fields(doc: object, cls: type, where: str) -> None:
    """`doc` holds exactly `cls`'s fields (the required ones at least), objects where it declares
    dicts, lists where it declares lists, text where it declares text (`"seal": 0` is a malformed
    seal, not a missing one): ValueError naming the field otherwise."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where.rstrip('.') or 'the manifest'} must be a JSON object")
    declared = {f.name: f for f in fields(cls)}
    unknown = sorted(set(doc) - set(declared))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(where + k for k in unknown)}")
    for name, f in declared.items():
        if name not in doc:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"missing field {where}{name}")
            continue
        kind = {"dict": dict, "list": list, "str": str}.get(str(f.type).partition("[")[0])
        if kind is not None and not isinstance(doc[name], kind):
            raise ValueError(f"{where}{name} must be a JSON {JSON_NAMES[kind]}, got {json_type(doc[name])}")


def read_manifest(artifact: str | Path, verify: bool = True) -> Manifest:
    """Read and check an artifact's manifest; with `verify`, every graph file's sha256 too."""
    root = restore(artifact)  # an export killed between its two renames (no atomic exchange) left it aside
    path = root / MANIFEST
    if not path.is_file():
        raise ExportError(f"{root}: not an exported policy (no {MANIFEST})")
    doc = read_json_object(path, ExportError)
    sealed = content_sha256(doc)  # before any check takes the document apart
    fmt = doc.get("format")
    if fmt != FORMAT:
        raise ExportError(f"{path}: format is {fmt!r}, expected {FORMAT!r}")
    if doc.get("version") not in (UNSEALED_VERSION, VERSION):
        raise ExportError(f"{path}: export version {doc.get('version')} is not supported (expected {VERSION}, or "
                          f"{UNSEALED_VERSION} from before sealed manifests)")
    try:
        _check_fields(doc, Manifest, "")
        for name, g in doc["graphs"].items():
            _check_fields(g, GraphEntry, f"graphs.{name}.")
        graphs = {name: GraphEntry(**g) for name, g in doc.pop("graphs").items()}
        manifest = Manifest(graphs=graphs, **doc)
        try:
            manifest.policy_spec  # noqa: B018 - validates the spec
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"spec is not a policy spec ({type(exc).__name__}: {exc})") from None
        K, n = int(manifest.sampler["steps"]), int(manifest.model["n_blocks"])
        table = manifest.cache["table"]
        if not isinstance(table, list) or len(table) != K or any(not isinstance(r, list) or len(r) != n for r in table):
            raise ValueError(f"cache.table must be {K} rows of {n} entries (steps x blocks)")
        if manifest.step_mode not in ("if", "patterns"):
            raise ValueError(f"unknown step mode {manifest.step_mode!r}")
        needed = ["encoder"] + (["step"] if manifest.step_mode == "if"
                                else [f"step_p{j}" for j in sorted(set(manifest.pattern_of_step))])
        if manifest.step_mode == "patterns" and len(manifest.pattern_of_step) != K:
            raise ValueError(f"pattern_of_step has {len(manifest.pattern_of_step)} entries, expected {K}")
        missing = [g for g in needed if g not in graphs]
        if missing:
            raise ValueError(f"no graph entry for {', '.join(missing)}")
        spec = manifest.policy_spec
        inputs = {i["name"]: i["shape"] for i in graphs["encoder"].inputs}
        for key, array in spec.obs.items():  # the spec robots are held to is the one the graph takes
            if inputs.get(key) != ["B", spec.n_obs_steps, *array.shape]:
                raise ValueError(f"spec.obs.{key} {list(array.shape)} does not match the encoder graph's input "
                                 f"{inputs.get(key)}")
        action_dim = spec.action_dim
        for part in ("scale", "offset"):  # the actions' unnormalisation, applied to every chunk
            try:
                values = np.asarray(manifest.normalizer["action"][part], dtype=np.float64)
            except (TypeError, ValueError):  # text, objects
                values = np.array([np.nan])
            if values.shape != (action_dim,) or not np.isfinite(values).all():
                raise ValueError(f"normalizer.action.{part} must be {action_dim} finite numbers (action_dim)")
    except KeyError as exc:  # an entry a nested object lacks
        raise ExportError(f"{path}: malformed manifest (missing entry {exc})") from None
    except (TypeError, AttributeError) as exc:  # a nested value of the wrong kind
        raise ExportError(f"{path}: malformed manifest (a value of the wrong type: {exc})") from None
    except ValueError as exc:
        raise ExportError(f"{path}: malformed manifest ({exc})") from None
    if manifest.seal and manifest.seal != sealed:  # checked after the fields, which name a malformed one
        raise ExportError(f"{path}: edited after export (its content no longer matches its seal); the graphs were "
                          "built for the exported values, so export again rather than editing the manifest")
    if not manifest.seal:  # removed, which turned the check off; with the version lowered to 1 as well, too
        raise ExportError(f"{path}: its seal is missing, so edits to it cannot be ruled out (exported before "
                          f"manifests were sealed, or the seal taken away); export again rather than editing the "
                          f"manifest")
    if verify:
        for name in graphs:
            graph_bytes(root, manifest, name)
    return manifest


def graph_bytes(artifact: str | Path, manifest: Manifest, name: str) -> bytes:
    """One graph file's content, refused unless its sha256 is the manifest's (read once, so
    what is checked is what gets loaded)."""
    g = manifest.graphs[name]
    f = Path(artifact) / g.file
    if not f.is_file():
        raise ExportError(f"{artifact}: graph {name!r} file {g.file} is missing")
    data = f.read_bytes()
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != g.sha256:
        raise ExportError(f"{f}: sha256 {got[7:19]}... does not match the manifest's {g.sha256[7:19]}... "
                          "(modified or corrupt; export again)")
    return data


def check_request(manifest: Manifest, where: str, cache: str | None = None, sampler: str | None = None,
                  steps: int | None = None) -> None:
    """Refuse settings other than the exported ones (None: take the artifact's)."""
    have_kind, have_steps = manifest.sampler["kind"], int(manifest.sampler["steps"])
    if sampler is not None and sampler != have_kind:
        raise ExportError(f"{where} was exported for sampler {have_kind}, not {sampler}: export again with "
                          f"--sampler {sampler}")
    if steps is not None and int(steps) != have_steps:
        raise ExportError(f"{where} was exported for {have_kind} with K={have_steps} steps, not {steps}: export again "
                          f"with --steps {steps}")
    if cache is None:
        return
    exported = manifest.cache.get("spec") or "none"
    want = manifest.cache.get("schedule_sha256")
    (head, path), (exported_head, exported_path) = schedule_parts(cache), schedule_parts(exported)
    # the same schedule may sit elsewhere (a relative path, another machine): its content decides
    same_file = path is not None and exported_path is not None and want is not None and path.is_file() \
        and schedule_digest(path) == want
    if path is not None and not path.is_file():  # a missing file is no other plan: said as elsewhere
        raise ExportError(f"--cache {cache.strip()}: schedule file not found: {path}")
    if path is not None and not same_file:  # a key added by hand is refused as such, not as another schedule
        try:  # than the exported one
            check_schedule_keys(read_json_object(path, CacheError))
        except ValueError as exc:
            raise CacheError(f"{path}: malformed schedule ({exc})") from None
    if cache.strip() != exported and not (head == exported_head and same_file):
        run_time = isinstance(head, CacheSpec) and (head.method == "threshold" or head.forecast)
        remedy = ("a cache deciding at run time cannot be exported: run it on the checkpoint, --backend torch"
                  if run_time else "export again with the cache you want")  # export refuses those
        raise ExportError(f"{where} was exported with --cache {exported}, not {cache.strip()}: the plan is part of "
                          f"the exported graphs, so {remedy}")
    if want and path is not None and path.is_file() and schedule_digest(path) != want:
        raise ExportError(f"{path} changed since {where} was exported with it (sha256 differs): export again")


def schedule_digest(path: Path) -> str:
    """A schedule file's content without when and by which code it was written (`created`,
    `code_version`), hashed: a schedule calibrated again, identically, is the same schedule."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):  # not a schedule: its bytes decide
        return sha256_file(path)
    if isinstance(doc, dict):
        doc = {k: v for k, v in doc.items() if k not in ("created", "code_version")}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def schedule_parts(spec: str) -> tuple[CacheSpec | str, Path | None]:
    """A cache spec less its schedule file, and that file (None without one): the same schedule at
    another path then compares equal. An unparsable spec is returned as is."""
    try:
        parsed = parse_cache_spec(spec)
    except CacheError:  # refused by check_request as not the exported spec
        return spec, None
    return replace(parsed, text="", path=None), None if parsed.path is None else Path(parsed.path)


def refuse_exported(path: str | Path, remedy: str) -> None:
    """The one line for an exported artifact given where a checkpoint is needed, so eval, calibrate
    and ptp embed name it alike instead of calling it an incomplete checkpoint (also an artifact that
    lost its manifest)."""
    if (Path(path) / MANIFEST).is_file():
        raise ExportError(f"{path} is an exported policy (ONNX), not a checkpoint: {remedy}")
    if Path(path).is_dir() and any(Path(path).glob("*.onnx")) and not (Path(path) / "meta.json").is_file():
        raise ExportError(f"{path} holds ONNX graphs but no {MANIFEST}: not a complete exported policy (export it "
                          "again)")
