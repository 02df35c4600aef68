"""Typed, strict configuration: YAML in, dataclasses out, unknown keys rejected.

Configs are plain dataclasses so that a checkpoint can store the full config and a
typo in a YAML file or a `key=value` override fails loudly with the key's dotted path."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from polcache.errors import ConfigError

INSTRUCTION_KEY = "instruction"  # the observation key a language-conditioned policy reads its instruction from
# the instruction width as a refusal of a LeRobot root's task strings names it (training and calibration)
INSTRUCTION_WIDTH_SETTING = "policy.vla.instruction_bytes={}"
EMBEDDING_KEY = "embedding"  # the frame features `polcache ptp embed` stores and a fine-tuned head reads
TEXT_ENCODERS = ("bytes", "minilm", "minilm-tokens", "minilm-tokens+bytes")  # policy.vla.text_encoder
BYTE_TEXT_ENCODERS = ("bytes", "minilm-tokens+bytes")  # those with byte tokens embedded from scratch
# policy.sampler.beta_schedule: the noise schedules both DDPM and DDIM (diffusers) define; training
# uses DDPM's and any checkpoint may be sampled with either
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# policy.objective -> the samplers that integrate what it trains the denoiser to predict: noise
# (epsilon) is read by DDPM/DDIM's update, a velocity (flow) by Euler steps; the other pairings run
# without complaint and produce garbage actions
SAMPLERS_FOR = {"epsilon": ("ddpm", "ddim"), "flow": ("flow",)}
SAMPLER_KINDS = tuple(kind for kinds in SAMPLERS_FOR.values() for kind in kinds)


@dataclass
class SamplerConfig:
    kind: str = "ddpm"  # ddpm | ddim | flow
    train_steps: int = 100
    inference_steps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True


@dataclass
class ImageEncoderConfig:
    channels: int = 32  # width of the first conv; later convs double it
    keypoints: int = 32  # spatial-softmax keypoints per camera
    feature_dim: int = 64
    crop_fraction: float = 0.9  # random crop at training, centre crop at inference


@dataclass
class VLAConfig:
    """The prefix of the `vla` family (ignored by DP-T): a small transformer over image, instruction
    and state tokens whose output the flow-matching action expert cross-attends to."""

    width: int = 128
    layers: int = 2
    heads: int = 4
    image_grid: int = 4  # image tokens per camera and frame: image_grid x image_grid
    instruction_bytes: int = 64  # UTF-8 bytes an instruction may take (longer ones are refused)
    # instruction bytes folded into one text token: 1 (every byte a token) keeps held-out wording
    # within the trained paraphrases' success on MT10, 4 did not (BENCHMARKS.md)
    bytes_per_token: int = 1
    # bytes: the byte tokens above, embedded from scratch | minilm: a frozen pretrained sentence
    # encoder (all-MiniLM-L6-v2 from a pinned package, `polcache[minilm]`), one projected token |
    # minilm-tokens: the same model's per-token states, each projected (the words stay apart) |
    # minilm-tokens+bytes: both token kinds side by side (MiniLM's states of "left" and "right"
    # are close, the bytes are not; BENCHMARKS.md, pad-reach)
    text_encoder: str = "bytes"
    # minilm paths: the frozen encoder's unit-norm vectors times sqrt(dim), so each feature starts at
    # the scale of the byte embeddings and the normalised state (off: as they come, 1/sqrt(384) per
    # feature, as in checkpoints from before this option; BENCHMARKS.md, pad-reach)
    unit_text_features: bool = False


@dataclass
class PolicyConfig:
    family: str = "dp-t"  # the architecture, by name (polcache.policy.families)
    horizon: int = 16
    n_obs_steps: int = 2
    obs_stride: int = 1  # control steps between observation frames (and past action tokens)
    frame_mode: str = "strided"  # "mixed": the newest half of the frames dense, the older half strided
    # Past-token prediction: which of the K-1 past action tokens the loss supervises: "all"
    # (PTP), "none" (only current and future: the usual diffusion policy), "recent:k".
    past_loss: str = "all"
    n_action_steps: int = 8
    n_layers: int = 8
    n_heads: int = 4
    width: int = 256
    ffn_mult: int = 4
    p_drop_attn: float = 0.3
    p_drop_emb: float = 0.0
    state_hidden: int = 256
    objective: str = "epsilon"  # epsilon (DDPM/DDIM) | flow (rectified flow velocity)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    vla: VLAConfig = field(default_factory=VLAConfig)


@dataclass
class TrainConfig:
    steps: int = 20000
    epochs: int = 0  # > 0: train this many passes over the training windows instead of `steps` (a train.steps
    # override on the command line sets it to 0: load_config)
    batch_size: int = 256
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-3
    warmup_steps: int = 500
    ema_decay: float = 0.999
    ema_warmup: int = 100  # EMA decay ramps up over the first steps, as in diffusion_policy
    checkpoint_every: int = 2000
    log_every: int = 50
    val_fraction: float = 0.05
    val_windows: int = 256  # validation windows whose sampled actions are compared with the demonstrations
    keep_best: bool = True  # also keep OUT/best: the EMA weights with the lowest validation action error
    state_noise: float = 0.0  # std of Gaussian noise added to the normalised state while training
    state_norm: str = "limits"  # limits ([min, max] -> [-1, 1]) | gaussian (zero mean, unit std)
    action_norm: str = "limits"
    num_workers: int = 0
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch default


@dataclass
class ExperimentConfig:
    task: str = ""
    dataset: str = ""
    out: str = "runs/default"
    obs_keys: list[str] = field(default_factory=lambda: ["state"])
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):  # null only: it took any value the other types refused (metrics_port=abc)
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1])
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {_shown(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {_shown(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {_shown(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    """A refused value as the user wrote it: YAML's null is an empty override (`out=`), not Python's None."""
    return "nothing (null: `key=` with no value, or a YAML null)" if value is None else repr(value)


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys with their dotted path."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in '{path}'" if path else ""
        named = ", ".join(repr(f"{path}.{k}" if path else k) for k in unknown)
        exc = ConfigError(f"unknown config key{where}: {named} (known: {', '.join(sorted(names))})")
        exc.key = f"{path}.{unknown[0]}" if path else str(unknown[0])  # for `located`: where the file gives it
        raise exc
    kwargs = {}
    for k, v in data.items():
        name = f"{path}.{k}" if path else k
        try:
            kwargs[k] = _coerce(v, hints[k], name)
        except ConfigError as exc:
            if not hasattr(exc, "key"):  # the innermost key whose value is refused, for `located`
                exc.key = name
            raise
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last silently,
    so a config that sets train.lr twice would train with whichever came later. Every config (files,
    overrides, a checkpoint's config.yaml) is read through `load_yaml`, which uses it."""

    def construct_document(self, node):
        self._refuse_duplicate_keys(node, "", set())
        return super().construct_document(node)

    def _refuse_duplicate_keys(self, node: yaml.Node, path: str, seen: set[int]) -> None:
        if id(node) in seen:  # an alias of a node already checked (or of its own ancestor)
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._refuse_duplicate_keys(item, f"{path}[{i}]", seen)
        elif isinstance(node, yaml.MappingNode):
            lines: dict = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`, then overriding base's keys, is meant
                    self._refuse_duplicate_keys(value_node, path, seen)
                    continue
                key = self.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else id(key_node)
                name = f"{path}.{key}" if path else str(key)
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise ConfigError(f"duplicate key {name} on line {line} (first on line {lines[key]}); "
                                      "give each key once")
                lines[key] = line
                self._refuse_duplicate_keys(value_node, name, seen)


def load_yaml(text: str) -> Any:
    """YAML text as Python values; a key given twice in a mapping is a ConfigError naming it and its lines."""
    return yaml.load(text, Loader=UniqueKeyLoader)


def apply_overrides(data: dict, overrides: list[str], example: str = "train.steps=1000") -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict. A key given twice with
    two values is refused, as a flag is (`train.lr=1e-3 train.lr=2e-3` had kept the last silently).
    `example`: an override of this kind of config, for the message refusing one without '='."""
    given: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. {example}")
        key, raw = item.split("=", 1)
        if given.setdefault(key.strip(), raw) != raw:
            raise ConfigError(f"override {key.strip()!r} given twice ({given[key.strip()]}, then {raw}); it takes "
                              f"one value")
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section of keys: the config gives it "
                                  f"{_shown(node)}")
        try:
            value = load_yaml(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc.__class__.__name__}); quote "
                              f"a string, write a list as [a, b]") from None
        except ConfigError as exc:
            raise ConfigError(f"override {item!r}: {exc}") from None
        if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
            raise ConfigError(f"override {item!r}: {key.strip()!r} is a section; set its keys, e.g. "
                              f"{key.strip()}.KEY=VALUE")
        node[parts[-1]] = value
    return data


def yaml_error_where(exc: yaml.YAMLError) -> str:
    """Where the parser gave up and why, in one line: ' at line 1, column 14: expected ...' (a bare
    class name left the user to bisect the file)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or problem is None:
        return f" ({exc.__class__.__name__})"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def read_yaml_mapping(path: str | Path) -> dict:
    """A config file's top-level mapping, or one ConfigError line saying what is wrong with the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = load_yaml(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML{yaml_error_where(exc)}") from None
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a YAML text file (not UTF-8)") from None
    except OSError as exc:
        raise ConfigError(f"{p}: unreadable ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return data


def key_lines(path: str | Path) -> dict[str, int]:
    """The line of each dotted key in a YAML config file (for messages; {} where it cannot be read)."""
    try:
        root = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    lines: dict[str, int] = {}
    todo = [(root, "")]
    while todo:
        node, prefix = todo.pop()
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    name = f"{prefix}.{key_node.value}" if prefix else key_node.value
                    lines.setdefault(name, key_node.start_mark.line + 1)
                    todo.append((value_node, name))
    return lines


def located(exc: ConfigError, path: str | Path | None, overrides: list[str]) -> ConfigError:
    """`exc` with the file line of the key it names (`exc.key`, set by `from_dict`: an unknown key, or
    one whose value is of the wrong type), unless an override set that key: a typo in a long config
    file was named by its dotted path alone."""
    key = getattr(exc, "key", None)
    if key is None or path is None or any(o.partition("=")[0].strip() == key for o in overrides):
        return exc
    line = key_lines(path).get(key)
    return ConfigError(f"{path}, line {line}: {exc}") if line else exc


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """The file's config with `overrides` applied and validated. A `train.steps` override without a
    `train.epochs` one trains that many steps: the file's epochs (which would win) are set aside. Either
    override alone must be >= 1, as nothing else would say how long to train."""
    data = read_yaml_mapping(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    overridden = {item.partition("=")[0].strip() for item in overrides or []}
    steps_only = "train.steps" in overridden and "train.epochs" not in overridden
    epochs_only = "train.epochs" in overridden and "train.steps" not in overridden
    if steps_only:
        data["train"]["epochs"] = 0
    try:
        cfg = from_dict(ExperimentConfig, data)
    except ConfigError as exc:
        raise located(exc, path, overrides or []) from None
    if {"train.steps", "train.epochs"} <= overridden and cfg.train.steps and cfg.train.epochs:  # epochs would win
        raise ConfigError(f"train.steps={cfg.train.steps} and train.epochs={cfg.train.epochs} both given: a run trains "
                          f"by one of them; give one")
    if steps_only and cfg.train.steps < 1:  # the file's epochs are set aside, so nothing would say how long to train
        raise ConfigError(f"train.steps={cfg.train.steps}: expected a positive number of steps (the override replaces "
                          f"the config's train.epochs; to train by epochs, set train.epochs=N instead)")
    if epochs_only and cfg.train.epochs < 1:  # 0 would silently train the config's (or default) train.steps
        raise ConfigError(f"train.epochs={cfg.train.epochs}: expected a positive number of epochs (with train.epochs=0 "
                          f"the run would train train.steps={cfg.train.steps} steps; to train by steps, set "
                          f"train.steps=N instead)")
    validate(cfg)
    _check_family_settings(cfg.policy)
    return cfg


def _check_family_settings(p: PolicyConfig) -> None:
    """Refuse a setting the chosen family never reads (a user tuning it would change nothing without a
    word). Only values other than the defaults: a checkpoint's config.yaml lists every key of both."""
    if p.family != "vla":
        default = VLAConfig()
        changed = [f.name for f in dataclasses.fields(VLAConfig) if getattr(p.vla, f.name) != getattr(default, f.name)]
        if changed:
            raise ConfigError(f"policy.vla.{changed[0]}: read by policy.family=vla only, and this config trains "
                              f"{p.family}: it would change nothing; remove it (or set policy.family=vla)")
    elif p.state_hidden != PolicyConfig.state_hidden:
        raise ConfigError("policy.state_hidden: read by dp-t's state encoder only; the vla family embeds the state "
                          "into policy.vla.width tokens: it would change nothing; remove it")


def past_tokens(p: PolicyConfig) -> int:
    """How many of the K-1 past action tokens the loss supervises (most recent first)."""
    past = p.n_obs_steps - 1
    if p.past_loss == "all":
        return past
    if p.past_loss == "none":
        return 0
    head, _, k = p.past_loss.partition(":")
    if head == "recent" and k.isdigit() and 0 <= int(k) <= past:
        return int(k)
    raise ConfigError(f"policy.past_loss must be 'all', 'none' or 'recent:k' with 0 <= k <= {past} "
                      f"(n_obs_steps - 1), got {p.past_loss!r}")


def _one_of(names) -> str:
    """"a, b or c": the choices an error message names, from the tuple the check uses."""
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]


def check_sampler_fits(kind: str, objective: str, what: str = "sampler") -> None:
    """Refuse sampling a policy with a sampler that does not read its denoiser's output (SAMPLERS_FOR);
    `what` names where the kind came from (a config key or a command-line option)."""
    fits = SAMPLERS_FOR.get(objective, ())
    if kind not in fits:
        sep = " " if what.startswith("-") else "="  # a command-line option or a config key
        trains = [o for o, kinds in SAMPLERS_FOR.items() if kind in kinds]  # a config may choose the objective too
        raise ConfigError(f"{what}{sep}{kind} does not fit policy.objective={objective} (a denoiser trained to "
                          f"predict {'a flow velocity' if objective == 'flow' else 'noise'}): use "
                          f"{what}{sep}{_one_of(fits)}"
                          + (f", or set policy.objective={trains[0]} to train a denoiser for {kind}"
                             if trains and sep == "=" else ""))


@dataclass(frozen=True)
class Range:
    """The values a numeric config field accepts: lo..hi, each end included unless `open`;
    `inf` means unbounded (and infinity itself is refused: a finite number is expected)."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: float) -> bool:
        return (math.isfinite(x) and (self.lo < x if self.lo_open else self.lo <= x)
                and (x < self.hi if self.hi_open else x <= self.hi))

    def __str__(self) -> str:
        def shown(end: float) -> str:  # an int end exactly (a seed's 2^63-1 read 9.22337e+18)
            return str(end) if isinstance(end, int) else f"{end:g}"

        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {shown(self.lo)}"
        return f"in {'(' if self.lo_open else '['}{shown(self.lo)}, {shown(self.hi)}{')' if self.hi_open else ']'}"


AT_LEAST_0, AT_LEAST_1 = Range(0), Range(1)
MAX_SEED = 2**63 - 1  # torch's generators take no larger seed (beyond, a traceback); every seed is checked to it
SEED = Range(0, MAX_SEED)
LEARNING_RATE = Range(0, 1e38, lo_open=True)  # AdamW applies it in float32 (max 3.4e38): beyond, a traceback
TRAIN_LENGTH = Range(0, 10**9)  # steps or epochs: a billion steps is years of training; beyond, a typo
PROBABILITY = Range(0, 1, hi_open=True)  # dropout, EMA decay, Adam betas, held-out share: 1 would freeze or drop all
# Every numeric field's accepted values, by dotted key (a tuple field: each element). Checked before
# the rules between fields below, which may divide by some of them.
RANGES: dict[str, Range] = {
    "policy.horizon": AT_LEAST_1, "policy.n_obs_steps": AT_LEAST_1, "policy.obs_stride": AT_LEAST_1,
    "policy.n_action_steps": AT_LEAST_1, "policy.n_layers": AT_LEAST_1, "policy.n_heads": AT_LEAST_1,
    "policy.width": AT_LEAST_1, "policy.ffn_mult": AT_LEAST_1, "policy.state_hidden": AT_LEAST_1,
    "policy.p_drop_attn": PROBABILITY, "policy.p_drop_emb": PROBABILITY,
    "policy.image.channels": AT_LEAST_1, "policy.image.keypoints": AT_LEAST_1, "policy.image.feature_dim": AT_LEAST_1,
    "policy.image.crop_fraction": Range(0, 1, lo_open=True),
    "policy.sampler.train_steps": AT_LEAST_1, "policy.sampler.inference_steps": AT_LEAST_1,
    "policy.vla.width": AT_LEAST_1, "policy.vla.layers": AT_LEAST_1, "policy.vla.heads": AT_LEAST_1,
    "policy.vla.image_grid": AT_LEAST_1, "policy.vla.instruction_bytes": AT_LEAST_1,
    "policy.vla.bytes_per_token": AT_LEAST_1,
    "train.steps": TRAIN_LENGTH, "train.epochs": TRAIN_LENGTH, "train.batch_size": AT_LEAST_1,
    "train.lr": LEARNING_RATE,
    "train.betas": PROBABILITY, "train.weight_decay": AT_LEAST_0, "train.warmup_steps": AT_LEAST_0,
    "train.ema_decay": PROBABILITY, "train.ema_warmup": AT_LEAST_0, "train.checkpoint_every": AT_LEAST_1,
    "train.log_every": AT_LEAST_1, "train.val_fraction": PROBABILITY, "train.val_windows": AT_LEAST_0,
    "train.state_noise": AT_LEAST_0, "train.num_workers": AT_LEAST_0, "train.seed": SEED,
    "train.threads": AT_LEAST_0,  # 0: torch's default thread count
}


def check_ranges(cfg: Any, ranges: dict[str, Range]) -> None:
    """Refuse the first field of `cfg` outside its range in `ranges`, naming its dotted key."""
    for key, allowed in ranges.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, x in items:
            if x not in allowed:
                name = key if i is None else f"{key}[{i}]"
                kind = "an integer" if isinstance(x, int) else "a finite number"
                raise ConfigError(f"{name} must be {kind} {allowed}, got {x!r}")


def validate(cfg: ExperimentConfig) -> None:
    """Refuse values the code would only trip over later (a traceback, or a run that trains garbage)."""
    p = cfg.policy
    check_ranges(cfg, RANGES)
    if p.width % p.n_heads:
        raise ConfigError(f"policy.width ({p.width}) must be divisible by policy.n_heads ({p.n_heads})")
    if not 1 <= p.n_obs_steps <= p.horizon:
        raise ConfigError(f"policy.n_obs_steps must be in 1..horizon ({p.horizon}), got {p.n_obs_steps}")
    if not 1 <= p.n_action_steps <= p.horizon - p.n_obs_steps + 1:
        raise ConfigError(f"policy.n_action_steps must be in 1..{p.horizon - p.n_obs_steps + 1} (policy.horizon "
                          f"{p.horizon} - policy.n_obs_steps {p.n_obs_steps} + 1), got {p.n_action_steps}")
    if p.objective not in SAMPLERS_FOR:
        raise ConfigError(f"policy.objective must be {_one_of(tuple(SAMPLERS_FOR))}, got {p.objective!r}")
    if p.frame_mode not in ("strided", "mixed"):
        raise ConfigError(f"policy.frame_mode must be 'strided' or 'mixed', got {p.frame_mode!r}")
    past_tokens(p)  # validates policy.past_loss
    if p.sampler.kind not in SAMPLER_KINDS:
        raise ConfigError(f"policy.sampler.kind must be one of {', '.join(SAMPLER_KINDS)}, got {p.sampler.kind!r}")
    check_sampler_fits(p.sampler.kind, p.objective, "policy.sampler.kind")
    if p.sampler.beta_schedule not in BETA_SCHEDULES:
        raise ConfigError(f"policy.sampler.beta_schedule must be {_one_of(BETA_SCHEDULES)}, "
                          f"got {p.sampler.beta_schedule!r}")
    if p.sampler.kind != "flow" and p.sampler.inference_steps > p.sampler.train_steps:  # flow has no noise levels
        raise ConfigError(f"policy.sampler.inference_steps ({p.sampler.inference_steps}) must be at most "
                          f"policy.sampler.train_steps ({p.sampler.train_steps}): a {p.sampler.kind} step takes one of "
                          f"the trained noise levels")
    t = cfg.train
    for name in ("state_norm", "action_norm"):
        if getattr(t, name) not in ("limits", "gaussian"):
            raise ConfigError(f"train.{name} must be 'limits' or 'gaussian', got {getattr(t, name)!r}")
    if t.action_norm == "gaussian" and p.sampler.clip_sample:
        raise ConfigError("train.action_norm=gaussian with policy.sampler.clip_sample=true: the sampler clips normalised "
                          "actions to [-1, 1], i.e. every action beyond one standard deviation (measured: 0% on "
                          "peg-insert-side-v3); use action_norm=limits or set policy.sampler.clip_sample=false")
    if t.steps == 0 and t.epochs == 0:
        raise ConfigError("train.steps and train.epochs are both 0: expected a positive train.steps (optimizer steps) "
                          "or train.epochs (passes over the training windows)")
    keys = [k for k in cfg.obs_keys if k != INSTRUCTION_KEY]
    if not keys or any(not (k == "state" or k.startswith("image_")) for k in keys):
        raise ConfigError(f"obs_keys must name 'state' and/or 'image_<camera>' keys (and 'instruction' for "
                          f"policy.family=vla), got {cfg.obs_keys}")
    if INSTRUCTION_KEY in cfg.obs_keys and p.family != "vla":
        from polcache.policy.families import get_family  # lazily (it imports torch): a mistyped family is named first

        get_family(p.family)
        raise ConfigError(f"obs_keys: 'instruction' needs a language-conditioned family (policy.family=vla), "
                          f"got policy.family={p.family!r}")
    if p.family == "vla":
        v = p.vla
        if INSTRUCTION_KEY not in cfg.obs_keys:
            raise ConfigError("policy.family=vla: obs_keys must include 'instruction'")
        if v.width % v.heads:
            raise ConfigError(f"policy.vla.width ({v.width}) must be divisible by policy.vla.heads ({v.heads})")
        if v.instruction_bytes % v.bytes_per_token:
            raise ConfigError(f"policy.vla.instruction_bytes ({v.instruction_bytes}) must be a multiple of "
                              f"policy.vla.bytes_per_token ({v.bytes_per_token})")
        if v.text_encoder not in TEXT_ENCODERS:
            raise ConfigError(f"policy.vla.text_encoder must be {_one_of(TEXT_ENCODERS)}, got {v.text_encoder!r}")
        if v.unit_text_features and v.text_encoder == "bytes":
            raise ConfigError("policy.vla.unit_text_features applies to the frozen MiniLM's vectors (text_encoder "
                              f"{_one_of([e for e in TEXT_ENCODERS if e != 'bytes'])}); byte embeddings are trained "
                              "at unit scale")
