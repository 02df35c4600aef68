"""Checkpoints: one directory holding everything needed to run a policy.

    config.yaml             the full experiment config
    model.safetensors       inference weights (the EMA weights)
    normalizer.safetensors  normalisation statistics
    meta.json               format version, code version, observation spec, task, training control
                            rate (`control_hz`, null where unknown; absent from older checkpoints), step,
                            and the sha256 of each other file (checked on loading; older checkpoints have
                            none, and those before config.yaml's have the weights' only); a multi-task
                            run's `tasks`; a PTP head's `embeddings` (the store, the encoder's checkpoint
                            and hash)
    train/                  optional: raw weights + optimizer state, for resuming training

Written atomically (temp directory + rename)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from safetensors.torch import load, save

import polcache
from polcache.atomic import atomic_directory, restore
from polcache.config import ExperimentConfig, from_dict, load_yaml, to_dict, validate, yaml_error_where
from polcache.data.normalize import Normalizer
from polcache.errors import CheckpointError, ConfigError, cut_short
from polcache.jsonfile import read_json_object
from polcache.outputs import replaced_whole
from polcache.policy.families import build_policy
from polcache.policy.pinned import PackageWeights, check_installed
from polcache.policy.policy import DiffusionPolicy
from polcache.policy.spec import ArraySpec, check_control_hz

FORMAT = "polcache-checkpoint"
VERSION = 1
REQUIRED = ("config.yaml", "model.safetensors", "normalizer.safetensors", "meta.json")


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{polcache.__version__}+{sha}" if sha else polcache.__version__


@dataclass
class TrainState:
    """What resuming needs beyond the inference files."""

    model: dict[str, torch.Tensor]
    optimizer: dict
    lr_scheduler: dict
    step: int
    random: dict[str, torch.Tensor] | None = None  # torch's random state at the step ("cpu", "cuda"); older: none


def save_checkpoint(path: str | Path, cfg: ExperimentConfig, policy: DiffusionPolicy,
                    ema_state: dict[str, torch.Tensor] | None = None, step: int = 0,
                    train_state: TrainState | None = None, extra_meta: dict | None = None) -> Path:
    """Write a checkpoint directory atomically. `ema_state` (if given) becomes the inference weights;
    `extra_meta` (JSON) is stored in meta.json, e.g. the validation scores of a best checkpoint."""
    path = Path(path)
    weights = {k: v.detach().cpu().contiguous() for k, v in (ema_state or policy.state_dict()).items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "step": step,
        "task": cfg.task,
        "obs_keys": policy.obs_keys,
        "obs_spec": {k: v.to_dict() for k, v in policy.spec.obs.items()},
        "action_dim": policy.action_dim,
        "control_hz": policy.spec.control_hz,
        "family": cfg.policy.family,
        **(extra_meta or {}),
    }
    pins = policy.external_weights()
    if pins:
        meta["external_weights"] = {name: pin.to_dict() for name, pin in pins.items()}
    files = {"config.yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False).encode(),
             "model.safetensors": save(weights),
             "normalizer.safetensors": save({k: v.contiguous() for k, v in policy.normalizer.state_dict().items()})}
    if train_state is not None:
        files["train/model.safetensors"] = save({k: v.detach().cpu().contiguous() for k, v in train_state.model.items()})
        state = io.BytesIO()
        torch.save({"optimizer": train_state.optimizer, "lr_scheduler": train_state.lr_scheduler,
                    "step": train_state.step, "random": train_state.random}, state)
        files["train/state.pt"] = state.getvalue()
    meta["sha256"] = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    with atomic_directory(path) as tmp:
        tmp.mkdir()
        if train_state is not None:
            (tmp / "train").mkdir()
        for name, data in files.items():  # with the umask's permissions (safetensors' save_file: owner-only)
            (tmp / name).write_bytes(data)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return path


def read_meta(path: str | Path) -> tuple[ExperimentConfig, dict]:
    """Validate a checkpoint directory and return (config, meta) without building the model."""
    path = restore(path)  # a save killed between its two renames (no atomic exchange) left it aside
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path} is not a directory")
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        runs = [sub for sub in ("last", "best") if (path / sub / "meta.json").is_file()]  # a training run's folder
        hint = f"; a training run: pass {path / runs[0]}" if runs else ""
        if (what := replaced_whole(path)) == "an exported policy":
            hint = ("; it is an exported policy, which eval and serve run (--backend ort); here, pass the "
                    "checkpoint it was exported from")
        elif what is not None:
            hint = f"; it is {what}"
        raise CheckpointError(f"{path}: not a complete polcache checkpoint (missing {', '.join(missing)}){hint}")
    meta = read_json_object(path / "meta.json", CheckpointError)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: meta.json format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')} is not supported (expected {VERSION})")
    text = (path / "config.yaml").read_bytes()
    # A config cut at a line end still parses, and the missing keys took their defaults: a trained
    # 16-step DDIM sampler ran 100 steps.
    _check_digest(path / "config.yaml", "config.yaml", text, meta,
                  "; it is the record of the training run: to sample otherwise, eval and serve take --sampler "
                  "and --steps")
    try:
        data = load_yaml(text.decode("utf-8", errors="replace"))
        if not isinstance(data, dict) or not data:  # a saved config is never empty: its defaults are written out
            raise ConfigError("empty or not a mapping (truncated?)")
        cfg = from_dict(ExperimentConfig, data)
        validate(cfg)
    except ConfigError as exc:
        raise CheckpointError(f"{path}/config.yaml: {str(exc).splitlines()[0]}") from None
    except yaml.YAMLError as exc:  # one saved before config.yaml had its digest, cut or damaged
        raise CheckpointError(f"{path}/config.yaml: not valid YAML{yaml_error_where(exc)} (truncated or "
                              f"damaged?)") from None
    return cfg, meta


def load_policy(path: str | Path, device: str | torch.device = "cpu") -> tuple[DiffusionPolicy, ExperimentConfig, dict]:
    """Load a checkpoint for inference (eval mode, EMA weights)."""
    path = Path(path)
    cfg, meta = read_meta(path)
    stats = read_tensors(path / "normalizer.safetensors", meta=meta)
    try:
        normalizer = Normalizer.from_state_dict(stats)
    except KeyError as exc:
        raise CheckpointError(f"{path}/normalizer.safetensors: {exc.args[0]}") from None
    weights = read_tensors(path / "model.safetensors", meta=meta)
    for file, tensors in (("normalizer.safetensors", stats), ("model.safetensors", weights)):
        bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:  # a diverged run or a damaged file: it would act on NaN
            raise CheckpointError(f"{path}/{file}: NaN or infinite values in {bad[0]}"
                                  + (f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""))
    check_external_weights(meta, path)
    try:
        obs_spec = {k: ArraySpec.from_dict(v) for k, v in meta["obs_spec"].items()}
        obs_keys, action_dim, task = list(meta["obs_keys"]), int(meta["action_dim"]), str(meta["task"])
        control_hz = check_control_hz(meta.get("control_hz"), "control_hz")  # absent: saved before it
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}/meta.json: malformed ({type(exc).__name__}: {exc})") from None
    _check_normalizer(normalizer, obs_spec, obs_keys, action_dim, path / "normalizer.safetensors")
    try:
        policy = build_policy(cfg.policy, obs_spec, obs_keys, action_dim, normalizer, task)
    except ConfigError as exc:
        raise CheckpointError(f"{path}/config.yaml: {exc}") from None
    if meta.get("family", cfg.policy.family) != cfg.policy.family:  # absent: saved before families
        raise CheckpointError(f"{path}: meta.json says policy family {meta['family']!r}, config.yaml "
                              f"{cfg.policy.family!r}; one of them was edited after training (the weights are "
                              f"of the family the run trained)")
    if (mismatch := _weights_mismatch(policy.state_dict(), weights)) is not None:
        raise CheckpointError(f"{path}: model.safetensors does not match config.yaml ({mismatch}); was config.yaml "
                              f"edited after training (layer counts, widths)?")
    policy.load_state_dict(weights)
    policy.spec = replace(policy.spec, control_hz=control_hz)
    return policy.to(device).eval(), cfg, meta


def _weights_mismatch(expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> str | None:
    """What differs between the tensors the config builds and those saved, counted with one example each
    (torch's own message lists every key: one line of thousands of characters for a changed layer count)."""
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    resized = [f"{k} is {tuple(weights[k].shape)}, the config makes {tuple(t.shape)}"
               for k, t in expected.items() if k in weights and weights[k].shape != t.shape]
    parts = [f"{len(names)} {what}, e.g. {names[0]}" for names, what in
             ((missing, "tensors missing"), (unexpected, "unexpected tensors"), (resized, "tensors of another shape"))
             if names]
    return "; ".join(parts) if parts else None


def read_tensors(file: Path, device: str | torch.device = "cpu", hint: str = "",
                 meta: dict | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file, or one line naming that file (safetensors raises several types
    for a truncated or damaged one); `hint` ends the line with what to do. With the checkpoint's
    `meta`, the file must match the sha256 it recorded (checkpoints saved before it had none): flipped
    bits in the weights loaded and acted, unnoticed, where they stayed finite."""
    try:
        data = file.read_bytes()
        tensors = load(data)
    except PermissionError:  # the system's refusal, said with its path (polcache.cli), not as damage
        raise
    except Exception as exc:
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0]}" if str(exc) else type(exc).__name__
        raise CheckpointError(f"{file}: cannot read it, truncated or damaged? ({why}){hint}") from None
    _check_digest(file, file.name, data, meta, hint)
    return {k: v.to(device) for k, v in tensors.items()}


def _check_digest(file: Path, name: str, data: bytes, meta: dict | None, hint: str = "") -> None:
    """`data` (the content of `file`, `name` in the checkpoint) matches the sha256 meta.json recorded.
    A checkpoint saved before digests has no "sha256" field (and one saved before config digests none
    for config.yaml); otherwise it must hold this file's, so damage to meta.json cannot switch the
    check off (damaged weights then loaded unnoticed)."""
    if meta is None or "sha256" not in meta:
        return
    digests = meta["sha256"]
    expected = digests.get(name) if isinstance(digests, dict) else None
    if expected is None and name == "config.yaml" and isinstance(digests, dict):
        return
    if not (isinstance(expected, str) and re.fullmatch(r"[0-9a-f]{64}", expected)):
        meta_file = file.parents[name.count("/")] / "meta.json"  # train/NAME: in the folder above
        raise CheckpointError(f"{meta_file}: sha256.{name} is {cut_short(repr(expected))}, expected that file's sha256 "
                              f"(64 hex digits): meta.json is damaged{hint}")
    if hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"{file}: its content does not match the sha256 in meta.json (damaged or changed "
                              f"after it was saved){hint}")


def _check_normalizer(normalizer: Normalizer, obs_spec: dict[str, ArraySpec], obs_keys: list[str], action_dim: int,
                      file: Path) -> None:
    """Refuse statistics that do not fit the model's state and action sizes (a normalizer file copied
    from another model), which would otherwise fail at the first observation, deep in sampling."""
    sizes = {"action": action_dim, **({"state": obs_spec["state"].shape[-1]} if "state" in obs_keys else {})}
    for key, size in sizes.items():
        if key not in normalizer:
            raise CheckpointError(f"{file}: no statistics for {key!r} (has {', '.join(normalizer.keys) or 'none'})")
        have = normalizer.stats(key)["scale"].shape[0]
        if have != size:
            raise CheckpointError(f"{file}: {key!r} statistics have {have} dimensions but the model's {key} has "
                                  f"{size} (a normalizer from another model?)")


def trained_tasks(path: str | Path) -> dict[str, list[str]]:
    """{"tasks": [...]}: the tasks a multi-task checkpoint trained on (meta.json `tasks`; an export
    carries them in its manifest's `model`), or {} where it records none."""
    path = Path(path)
    try:
        if (path / "meta.json").is_file():
            tasks = read_json_object(path / "meta.json").get("tasks")
        else:
            tasks = (read_json_object(path / "manifest.json").get("model") or {}).get("tasks")
    except Exception:  # noqa: BLE001 - only ever a hint: what needs it stands without it
        return {}
    return {"tasks": [str(t) for t in tasks]} if isinstance(tasks, list) and tasks else {}


def no_task_hint(path: str | Path) -> str:
    """For a refusal of a checkpoint or export that names no task: the tasks a multi-task run trained
    on, or "" where it records none (an older checkpoint)."""
    tasks = trained_tasks(path).get("tasks")
    return f" (it was trained on {', '.join(tasks)})" if tasks else ""


def check_external_weights(meta: dict, path: str | Path) -> None:
    """Refuse a checkpoint whose pinned pretrained weights (meta.json `external_weights`) are not
    the installed package's, naming both."""
    for record in meta.get("external_weights", {}).values():
        check_installed(PackageWeights.from_dict(record, f"{path}/meta.json"), f"checkpoint {path}", CheckpointError)


def load_train_state(path: str | Path, meta: dict | None = None) -> TrainState | None:
    """Raw weights + optimizer state saved for resuming, or None if the checkpoint has none; with the
    checkpoint's `meta`, each file must match the sha256 it recorded."""
    train = Path(path) / "train"
    if not (train / "state.pt").is_file():
        return None
    try:
        model, state = (train / "model.safetensors").read_bytes(), (train / "state.pt").read_bytes()
    except PermissionError:  # not damage: --fresh would set a good run aside
        raise
    except OSError as exc:  # train/model.safetensors missing, a folder in a file's place
        raise CheckpointError(f"{train}: cannot read the training state to resume from ({exc.strerror}: "
                              f"{exc.filename}); pass --fresh to start over") from None
    # damage is named by the digests first: torch's own error for a damaged state.pt advises loading it
    # with weights_only=False, which would run whatever the damaged pickle holds
    for name, data in (("model.safetensors", model), ("state.pt", state)):
        _check_digest(train / name, f"train/{name}", data, meta, "; pass --fresh to start over")
    try:
        return TrainState(load(model), *_optimizer_state(state))
    except Exception as exc:  # torch and safetensors raise several types for truncated/corrupt files
        first = re.split(r"(?<=\.)\s", str(exc).splitlines()[0])[0] if str(exc) else ""  # no weights_only advice
        raise CheckpointError(f"{train}: cannot read the training state to resume from ({type(exc).__name__}: "
                              f"{first}); pass --fresh to start over") from None


def _optimizer_state(data: bytes) -> tuple[dict, dict, int, dict[str, torch.Tensor] | None]:
    state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")  # the optimizer moves it back
    return state["optimizer"], state["lr_scheduler"], int(state["step"]), state.get("random")


def check_compatible(meta: dict, obs_spec: dict[str, ArraySpec], action_dim: int, where: str) -> None:
    """Refuse a checkpoint whose observation or action shapes do not fit an environment/robot."""
    for key in meta["obs_keys"]:
        want = ArraySpec.from_dict(meta["obs_spec"][key])
        have = obs_spec.get(key)
        if have is None:
            raise CheckpointError(f"checkpoint expects observation {key!r} {list(want.shape)}, "
                                  f"but {where} provides only {sorted(obs_spec)}")
        if tuple(have.shape) != tuple(want.shape):
            raise CheckpointError(f"observation {key!r}: checkpoint expects shape {list(want.shape)}, "
                                  f"{where} gives {list(have.shape)}")
    if int(meta["action_dim"]) != int(action_dim):
        raise CheckpointError(f"action dimension: checkpoint predicts {meta['action_dim']}, {where} takes {action_dim}")
