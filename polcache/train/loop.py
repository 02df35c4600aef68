"""Training: AdamW, cosine schedule with warm-up, EMA weights, periodic atomic checkpoints,
resume after interruption, and torch DDP when launched by torchrun.

The run directory holds `last/` (a full checkpoint plus optimizer state, rewritten every
`checkpoint_every` steps), `best/` (the EMA weights whose sampled actions on held-out
episodes came closest to the demonstrations) and `train_log.jsonl`. Running the same
command again resumes from `last/` (refused if the task, data, validation split or policy differ) unless
`fresh=True`, which moves the previous run's files aside into `previous-<time>/`; with no `last/`
to resume (a run killed before its first checkpoint), an earlier run's `best/` and log are moved
aside the same way, so the new run neither appends to that log nor is judged against that best.
A loss that becomes NaN or infinite stops the run before the weights take the step.
SIGTERM (a process manager stopping the run) is handled as Ctrl-C: `last/` is saved first (the
command then exits 143 where Ctrl-C exits 130).

Length follows the data when `train.epochs` is set: the step count is epochs x batches per
epoch, so a dataset twice as large trains twice as many steps under the same config."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from polcache.atomic import atomic_write_text, naming_errors, restore
from polcache.config import EMBEDDING_KEY, INSTRUCTION_KEY, INSTRUCTION_WIDTH_SETTING, ExperimentConfig, to_dict
from polcache.data import EpisodeStore, Normalizer, SequenceDataset, episode_split, open_dataset
from polcache.data.normalize import differing_keys
from polcache.data.store import first_non_finite, recorded_tasks
from polcache.errors import CheckpointError, ConfigError, DatasetError, TrainingError
from polcache.jsonfile import standard_json
from polcache.outputs import enclosing_output, unwritable
from polcache.policy.checkpoint import REQUIRED as CHECKPOINT_FILES
from polcache.policy.checkpoint import (TrainState, check_external_weights, load_train_state, read_meta, read_tensors,
                                       save_checkpoint)
from polcache.policy.device import resolve_device, to_device
from polcache.policy.families import build_policy as build_family_policy
from polcache.policy.policy import DiffusionPolicy
from polcache.policy.spec import check_control_hz
from polcache.signals import interrupts_held, sigterm_as_interrupt
from polcache.train.batches import EpochBatches
from polcache.train.ema import EMA
from polcache.train.run_lock import RUN_LOCK, run_lock
from polcache_client.signals import interrupts_deferred

FRESH_HINT = "; pass --fresh to start over"  # ends a line about a run that cannot be resumed


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _world_size() -> int:
    """The processes sharing the run: torchrun's WORLD_SIZE, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_rank() -> int:
    """This process's rank as torchrun gives it (RANK), before the process group exists; 0 alone."""
    return int(os.environ.get("RANK", "0")) if _world_size() > 1 else 0


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = _world_size()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def build_policy(cfg: ExperimentConfig, store: EpisodeStore) -> DiffusionPolicy:
    spec = store.obs_spec()
    missing = [k for k in cfg.obs_keys if k not in spec]
    if missing:
        from polcache.ptp.embeddings import ATTR as EMBEDDINGS

        hint = (f"; a language-conditioned policy reads {INSTRUCTION_KEY!r}, which `polcache record --instructions` "
                f"and `polcache data import-lerobot --instructions` write" if INSTRUCTION_KEY in missing else
                "; it is an embedding store from `polcache ptp embed`, which `polcache ptp finetune` trains on"
                if isinstance(store.attrs.get(EMBEDDINGS), dict) else "")
        raise ConfigError(f"obs_keys {missing} are not in dataset {cfg.dataset} (it has {sorted(spec)}){hint}")
    normalizer = fit_normalizer(store, cfg, cfg.dataset)
    policy = build_family_policy(cfg.policy, spec, cfg.obs_keys, store.action_dim, normalizer, cfg.task)
    policy.spec = replace(policy.spec, control_hz=dataset_rate(store, cfg.dataset))
    return policy


def fit_normalizer(store: EpisodeStore, cfg: ExperimentConfig, where: str) -> Normalizer:
    """The normaliser a run of `cfg` fits on the dataset (`where`): its actions', and its states' where
    the policy observes them, over every episode."""
    arrays, modes = {"action": store.array("action")}, {"action": cfg.train.action_norm}
    if "state" in cfg.obs_keys:
        arrays["state"], modes["state"] = store.array("state"), cfg.train.state_norm
    for key, x in arrays.items():  # where, so the user can find it (written by hand or by another tool)
        if (at := first_non_finite(x, store.episode_starts)) is not None:
            raise DatasetError(f"dataset {where}: {key} holds NaN or inf at episode {at[0]} frame {at[1]}")
    try:
        return Normalizer.fit(arrays, modes)
    except ValueError as exc:  # non-finite values: the dataset's fault, named as such
        raise DatasetError(f"dataset {where}: {exc}") from None


def dataset_rate(store: EpisodeStore, where: str) -> float | None:
    """The control steps per second the dataset was recorded at (its `fps` attr, which `polcache record`
    and the LeRobot import write), None where it states none: the rate the trained policy acts at."""
    try:
        return check_control_hz(store.attrs.get("fps"), "fps")
    except ValueError as exc:
        raise DatasetError(f"dataset {where}: attrs {exc}") from None


@dataclass
class TrainingSource:
    """What a run learns from: the episode store its windows are cut from, the policy to train
    and the observation keys of the windows (the policy's own, or `embedding` for a head
    fine-tuned on stored per-frame embeddings, see polcache.ptp.finetune)."""

    store: EpisodeStore
    policy: DiffusionPolicy
    keys: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)  # for every checkpoint's meta.json: what made the data


def dataset_source(cfg: ExperimentConfig, progress: bool = False) -> TrainingSource:
    """The recorded dataset `cfg.dataset` and a freshly initialised policy for it (sets cfg.task)."""
    if not cfg.dataset:
        raise ConfigError("dataset: no dataset path given (set `dataset:` in the config or dataset=PATH)")
    language = INSTRUCTION_KEY in cfg.obs_keys  # a LeRobot root's task strings are then its instructions
    store = open_dataset(cfg.dataset, progress=progress,
                         instruction_bytes=cfg.policy.vla.instruction_bytes if language else 0,
                         instruction_setting=INSTRUCTION_WIDTH_SETTING)
    cfg.task = run_task(cfg.task, store.attrs, str(cfg.dataset))
    if launch_rank() == 0:
        _note_large_lerobot_images(cfg, store)
    return TrainingSource(store, build_policy(cfg, store), list(cfg.obs_keys))


def run_task(given: str, attrs: Mapping[str, Any], dataset: str) -> str:
    """The task a run on a dataset with `attrs` records: `given` (the config's task) where the dataset
    was recorded on it, else the dataset's own task ("" for several). A task the dataset was not
    recorded on is refused (ConfigError): the checkpoint would name it and eval would run it."""
    recorded = recorded_tasks(attrs)
    if len(recorded) > 1:
        if given and given not in recorded:  # the config's task was accepted and named the checkpoint
            raise ConfigError(f"task is {given!r} but dataset {dataset} was recorded on {', '.join(recorded)}; set "
                              f"task to one of them (eval's default) or task='' (none)")
        return given
    if given and recorded and given != recorded[0]:
        raise ConfigError(f"task is {given!r} but dataset {dataset} was recorded on {recorded[0]!r}; set "
                          f"task={recorded[0]} (or task='': the dataset's)")
    return given or (recorded[0] if recorded else "")


LARGE_IMAGE_PX = 128  # a camera side above this, imported whole from a LeRobot root, earns a note


def _note_large_lerobot_images(cfg: ExperimentConfig, store: EpisodeStore) -> None:
    """`dataset=ROOT` imports a LeRobot root's cameras at their own size (480x640 for ALOHA): the policy
    then trains on them, slowly, with no word of the smaller route."""
    from polcache.data.lerobot import is_lerobot_root

    spec = store.obs_spec()
    big = [f"{k} {spec[k].shape[0]}x{spec[k].shape[1]}" for k in cfg.obs_keys
           if k.startswith("image_") and k in spec and max(spec[k].shape[:2]) > LARGE_IMAGE_PX]
    if big and is_lerobot_root(cfg.dataset):
        print(f"note: {cfg.dataset} is imported with its cameras at their own size ({', '.join(big)}), and the "
              f"policy trains on those; for smaller images, `polcache data import-lerobot {cfg.dataset} "
              f"--image-size 96x96 --out DATA.zarr` and dataset=DATA.zarr", file=sys.stderr)


def total_steps(cfg: ExperimentConfig, n_windows: int) -> int:
    """Optimizer steps of the run: `train.epochs` passes over the windows (at the global batch
    size, however many processes share it), else `train.steps`."""
    if cfg.train.epochs <= 0:
        return cfg.train.steps
    return cfg.train.epochs * max(1, n_windows // cfg.train.batch_size)


VAL_BATCH = 32  # validation's own batch size: the windows and the noise each draws do not depend on train.batch_size


def spread_windows(n: int, count: int) -> list[int]:
    """`count` indices (all `n` where there are fewer) spread evenly over `n` windows."""
    return torch.linspace(0, n - 1, min(n, count)).long().unique().tolist() if n and count else []


@torch.no_grad()
def validate(policy: DiffusionPolicy, data: SequenceDataset, windows: int, seed: int) -> dict:
    """Held-out metrics of `policy` (in eval mode): the denoising loss, and the mean squared error
    (normalised units) between the actions it samples and the demonstrated ones over the executed
    part of the chunk -- the closed-loop proxy used to choose the best checkpoint. The actions are
    sampled on `windows` (train.val_windows) windows spread over `data`, the loss taken on at least
    VAL_BATCH; batched by VAL_BATCH from one seeded generator, so a run resumed with another
    train.batch_size judges best/ on the windows and noise its stored score saw."""
    if len(data) == 0:
        return {}
    policy.eval()
    g = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    start, n_act = policy.cfg.n_obs_steps - 1, policy.cfg.n_action_steps

    def batches(count: int):
        subset = torch.utils.data.Subset(data, spread_windows(len(data), count))
        for batch in DataLoader(subset, batch_size=VAL_BATCH, shuffle=False):
            yield to_device(batch, g.device)

    losses = [(policy.compute_loss(batch, g).item(), len(batch["action"]))
              for batch in batches(max(windows, VAL_BATCH))]
    out = {"val_loss": sum(loss * n for loss, n in losses) / sum(n for _, n in losses)}  # per window
    errors = []
    for batch in batches(windows):
        x = policy.sample(policy.encode(batch["obs"]), policy.sampler(), generator=g)
        target = policy.normalizer.normalize("action", batch["action"])
        errors.append(((x - target)[:, start:start + n_act] ** 2).mean(dim=(1, 2)))
    if errors:
        out["val_action_mse"] = torch.cat(errors).mean().item()
    return out


def train(cfg: ExperimentConfig, fresh: bool = False, progress: bool = True, device: str = "cpu",
          source: TrainingSource | None = None) -> Path:
    """Train the policy described by `cfg` on `device` (cpu, cuda, cuda:N, auto; under torchrun each
    process takes its LOCAL_RANK's GPU); returns the path of the final checkpoint (`out/last`).
    `source`: what to learn from (default: `dataset_source(cfg)`)."""
    out = Path(cfg.out)
    if launch_rank() == 0:  # a save killed between its two renames (no atomic exchange) left a checkpoint
        for sub in ("last", "best"):  # aside: put back before it is checked, resumed or moved by --fresh
            restore(out / sub)
    check_out(out, cfg.dataset, fresh)
    world = _world_size()
    if cfg.train.batch_size < world:  # each process takes batch_size // world windows: 0 fails after the data loads
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is smaller than the world size {world} (processes "
                          f"sharing the batch, each taking batch_size // {world} windows); set train.batch_size >= "
                          f"{world}")
    with run_lock(out, launch_rank()), sigterm_as_interrupt():
        return _train(cfg, fresh, progress, device, source)


def _task_names(store: EpisodeStore) -> list[str]:
    """A multi-task run's tasks, for the checkpoint's meta.json: its config names none, so commands ask
    for one and list these. None where the episodes' task strings are their instructions (a LeRobot
    root's are language: `eval --task` would look for an environment called "go to the left pad")."""
    names = sorted(set(store.tasks))
    if len(names) < 2:
        return []
    if INSTRUCTION_KEY in store.obs_keys:
        from polcache.policy.language import decode_instruction

        firsts = store.array(INSTRUCTION_KEY)[store.episode_starts]
        if all(decode_instruction(row) == task for row, task in zip(firsts, store.tasks)):
            return []
    return names


def _train(cfg: ExperimentConfig, fresh: bool, progress: bool, device: str, source: TrainingSource | None) -> Path:
    dev, rank, world = _process_device(device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed + rank)
    out = Path(cfg.out)
    source = source or dataset_source(cfg, progress=progress and rank == 0)
    store, policy = source.store, source.policy.to(dev)
    run_meta = ({"tasks": names} if (names := _task_names(store)) else {}) | source.provenance  # in every meta.json
    train_ids, val_ids = episode_split(store.num_episodes, cfg.train.val_fraction, cfg.train.seed)
    p = cfg.policy
    train_data = SequenceDataset(store, p.horizon, p.n_obs_steps, source.keys, train_ids, p.obs_stride, p.frame_mode)
    val_data = SequenceDataset(store, p.horizon, p.n_obs_steps, source.keys, val_ids, p.obs_stride, p.frame_mode)

    steps = total_steps(cfg, len(train_data))
    optimizer = torch.optim.AdamW([q for q in policy.parameters() if q.requires_grad], lr=cfg.train.lr, betas=cfg.train.betas,
                                  weight_decay=cfg.train.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, cfg.train.warmup_steps, steps))
    ema = EMA(policy, cfg.train.ema_decay, cfg.train.ema_warmup)
    step, elapsed = 0, 0.0
    last = out / "last"
    if rank == 0:
        _finish_set_aside(out)
    if not fresh and last.exists():
        step, elapsed = _resume(last, cfg, policy, optimizer, lr_sched, ema, dev, rank == 0, world == 1)
        if rank == 0:  # a run already at its plan's length returns at once: say why nothing trains
            done = (f"; the plan is {steps} steps, so there is nothing left to train (give a larger train.steps or "
                    f"train.epochs to train on, or --fresh to start over)" if step >= steps else "")
            print(f"resuming from {last} at step {step}{done}")
            _forget_log_after(out / "train_log.jsonl", step)
    elif rank == 0:  # --fresh, or nothing to resume: what an earlier run left is not this run's
        _set_aside_previous_run(out, "--fresh" if fresh else f"no {last} to resume from (the run stopped before "
                                                            f"its first checkpoint?), so a new run starts")
    # what eval and serve hold their rates to: said once a resume's checks passed (a refused one ran at no rate)
    if rank == 0 and (hz := policy.spec.control_hz) is not None:
        print(f"dataset rate: {hz:g} fps, so the policy acts at {hz:g} Hz (eval and serve check their control rate "
              f"against it)")
    saved = step if step else None  # the step OUT/last holds from this run, if any

    model = policy
    if world > 1:
        model = DistributedDataParallel(policy, device_ids=[dev.index] if dev.type == "cuda" else None)
    # from the run's step on, the batches an uninterrupted run takes; the workers' seeds from the run's seed
    order = EpochBatches(len(train_data), cfg.train.batch_size // world, cfg.train.seed, step, rank, world)
    loader = DataLoader(train_data, batch_sampler=order, num_workers=cfg.train.num_workers,
                        persistent_workers=cfg.train.num_workers > 0,
                        generator=torch.Generator().manual_seed(cfg.train.seed + rank))
    batches = iter(loader)
    log_path = out / "train_log.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if rank == 0 and step < steps:  # a new run's plan, or a resumed one's given another length: when it ends
        _announce_plan(cfg, steps, len(train_data), len(val_data), store.num_episodes, log_path)
    # after the plan's lines: a bar drawn first had them printed over it
    bar = tqdm(total=steps, initial=step, disable=not progress or rank != 0, desc="train", unit="step")
    judge = copy.deepcopy(policy)  # holds the EMA weights while validating
    best = _best_so_far(out / "best")

    def checkpoint_due(at: int) -> bool:
        return at % cfg.train.checkpoint_every == 0 or at == steps

    def validate_checkpoint(at: int, best: float) -> float:
        """Validate the EMA weights just saved in OUT/last at step `at`, keep them as best/ if they score
        better than `best`, log the scores; returns the best score."""
        judge.load_state_dict(ema.state_dict())
        val = validate(judge, val_data, cfg.train.val_windows, cfg.train.seed)
        score = val.get("val_action_mse", val.get("val_loss"))
        improved = cfg.train.keep_best and score is not None and score < best
        if improved:
            best = score
            save_checkpoint(out / "best", cfg, judge, step=at, extra_meta={"validation": val, **run_meta})
        _log(log_path, {"step": at, **val, "best": improved, "checkpoint": str(last)})
        return best

    policy.train()
    t0 = time.monotonic() - elapsed  # elapsed_s counts on from the checkpoint resumed
    try:
        # a run interrupted while validating saved OUT/last at that step first: its validation is still due
        if rank == 0 and step and checkpoint_due(step) and not _validated(log_path, step):
            print(f"validating step {step}, whose validation was interrupted")
            best = validate_checkpoint(step, best)
        while step < steps:
            batch = to_device(next(batches), dev)
            # A step is taken whole or not at all: Ctrl-C or SIGTERM meanwhile waits for its end, so the state
            # saved on the way out (weights, optimizer, random state) is that of a step boundary, from which
            # the resumed run goes on exactly as the uninterrupted one (twice: abandoned, as a hung step must be).
            with interrupts_deferred("finishing the training step under way"):
                loss = model(batch, cfg.train.state_noise)  # forward is the training loss, so DDP syncs its gradients
                if not _finite(loss, world):  # before the update: the weights stay those of the last good step
                    what = (f"the training loss is {loss.item()}" if world == 1 else
                            "a process's training loss is not finite")
                    raise TrainingError(_diverged(cfg, step + 1, what, last, saved))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                lr = optimizer.param_groups[0]["lr"]  # this step's rate: the scheduler now holds the next one's
                lr_sched.step()
                step += 1
                ema.update(policy, step)
                if rank == 0:
                    bar.update(1)
                    if step % cfg.train.log_every == 0 or step == steps:  # logged with it: a resumed run goes on after
                        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
                        _log(log_path, {"step": step, "loss": loss.item(), "lr": lr,
                                        "elapsed_s": round(time.monotonic() - t0, 2)})
            if rank == 0 and checkpoint_due(step):
                saved = _save(last, cfg, policy, ema, optimizer, lr_sched, step, saved, time.monotonic() - t0, run_meta)
                best = validate_checkpoint(step, best)
    except KeyboardInterrupt:
        if rank == 0 and world == 1 and step > 0:  # keep the work done since the last checkpoint
            with interrupts_held():
                print(f"\ninterrupted: saving {last} at step {step} (Ctrl-C and SIGTERM are ignored until it is "
                      f"saved)", flush=True)
                _save(last, cfg, policy, ema, optimizer, lr_sched, step, saved, time.monotonic() - t0, run_meta)
            print(f"interrupted: saved {last} at step {step}; run the same command to resume")
        raise
    bar.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return last


def _process_device(device: str) -> tuple[torch.device, int, int]:
    """This process's device, rank and world size: under torchrun each process takes its LOCAL_RANK's GPU."""
    dev = resolve_device(device)
    rank, world = _distributed()
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return dev, rank, world


def _announce_plan(cfg: ExperimentConfig, steps: int, train_windows: int, val_windows: int, episodes: int,
                   log_path: Path) -> None:
    """Say how long the run will be (and what will not work out), once per plan: a resumed run with the same
    plan stays quiet. Printed also with --no-progress: the run's length is worth a line in any log."""
    epochs = (f" ({cfg.train.epochs} epochs of {steps // cfg.train.epochs} batches; train.epochs sets the length, "
              f"not train.steps)" if cfg.train.epochs else "")
    batch = min(cfg.train.batch_size, train_windows)  # drop_last: a short batch only when it is all there is
    whole = (f" (all training windows; train.batch_size={cfg.train.batch_size} is more than there are)"
             if batch < cfg.train.batch_size else "")
    plan = f"{steps} steps{epochs} at batch {batch}{whole}, {train_windows} training windows"
    logged = _logged_plan(log_path)
    if plan == logged:
        return
    print(f"training {plan}" + (f" (the run's plan was {logged})" if logged else ""))
    if steps < cfg.train.warmup_steps:  # cosine_with_warmup: at most steps / warmup_steps of the rate
        print(f"warning: the run ends inside its learning-rate warm-up (train.warmup_steps="
              f"{cfg.train.warmup_steps}, {steps} steps): the rate reaches "
              f"{cfg.train.lr * steps / cfg.train.warmup_steps:.3g}, not train.lr={cfg.train.lr:g}; lower "
              f"train.warmup_steps or train longer", file=sys.stderr)
    if (unjudged := _unvalidated(cfg, episodes, val_windows)) is not None:
        print(f"warning: {unjudged}", file=sys.stderr)
    _log(log_path, {"steps": steps, "batch": batch, "train_windows": train_windows, "val_windows": val_windows,
                    "plan": plan})


def _unvalidated(cfg: ExperimentConfig, episodes: int, val_windows: int) -> str | None:
    """Why the run cannot judge best/ by val_action_mse (None when it can): with no held-out episode
    there is no validation and no best/; with train.val_windows=0 only the denoising loss is computed."""
    if val_windows == 0:
        why = ("train.val_fraction=0 holds out no episode" if cfg.train.val_fraction == 0
               else f"the dataset has {episodes} episode, none left to hold out at train.val_fraction="
                    f"{cfg.train.val_fraction:g} (record more episodes)")
        return f"no validation: {why}; best/ is not written, so evaluate last/"
    if cfg.train.val_windows == 0:
        return ("train.val_windows=0: validation samples no actions, so best/ keeps the lowest val_loss (the "
                "denoising loss), not the lowest val_action_mse")
    return None


def _forget_log_after(path: Path, step: int) -> None:
    """Drop the log's records of steps after `step`, the checkpoint a run resumes from, and a last line
    a kill left half-written: a run stopped between checkpoints (killed, or its save cut short) trains
    those steps again, and its log would otherwise hold each of them twice, with different losses."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    steps = [_logged_step(line) for line in lines]
    kept = [line for line, logged in zip(lines, steps) if logged is not None and logged <= step]
    damaged = [n for n, logged in enumerate(steps[:-1], 1) if logged is None]  # not the last: a kill's torn line
    if damaged:  # records lost to damage, not to the resumption: said, as every later reader trusts the lines
        shown = ", ".join(map(str, damaged[:5])) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
        print(f"warning: {path}: line{'s' if len(damaged) > 1 else ''} {shown} unreadable (damaged), dropped as it "
              f"resumes", file=sys.stderr)
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


def _logged_step(line: str) -> int | None:
    """A log line's step (0 for the plan line), None for a line that is not a whole record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not line.endswith("\n"):
        return None
    return record["step"] if isinstance(record.get("step"), int) else 0


def _logged(path: Path, key: str) -> list[dict]:
    """The log's records that hold `key` ([] without a log); only the lines naming it are parsed, not
    every step's. Every line is a whole record: a new run has no log, a resumed one's went through
    _forget_log_after."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [record for record in map(json.loads, (line for line in lines if f'"{key}"' in line)) if key in record]


def _logged_plan(path: Path) -> str | None:
    """The plan of the log's last plan line (None without one): the one a resumed run has followed."""
    plans = _logged(path, "plan")
    return plans[-1]["plan"] if plans else None


def _validated(path: Path, step: int) -> bool:
    """Whether the log holds the validation of `step` (its line names the checkpoint validated)."""
    return any(record["step"] == step for record in _logged(path, "checkpoint"))


def save_initial(cfg: ExperimentConfig) -> Path:
    """Checkpoint the config's policy at initialisation (no training) as OUT/last: the floor
    against which trained policies are compared. Under the run lock, as a training of OUT is: a
    suite's baseline written while a run trains there would replace that run's last/."""
    torch.manual_seed(cfg.train.seed)
    with run_lock(Path(cfg.out)):
        return save_checkpoint(Path(cfg.out) / "last", cfg, dataset_source(cfg).policy, step=0)


def _best_so_far(path: Path) -> float:
    """The validation score stored with OUT/best, so a resumed run only replaces it with a better one."""
    try:
        val = json.loads((path / "meta.json").read_text())["validation"]
        return float(val.get("val_action_mse", val.get("val_loss")))
    except (OSError, ValueError, KeyError, TypeError):
        return math.inf


def _save(path: Path, cfg: ExperimentConfig, policy: DiffusionPolicy, ema: EMA, optimizer, lr_sched, step: int,
          saved: int | None, elapsed: float, meta: dict) -> int:
    """Checkpoint the run at `step` as `path` (OUT/last), with the run's seconds so far (`elapsed`, from
    which a resumed run's elapsed_s counts on) and `meta` in its meta.json, and return the step; weights
    that are no longer finite are refused, so `path` keeps the last good step (`saved`)."""
    for name, weights in (("weights", policy.state_dict()), ("EMA weights", ema.state_dict())):
        bad = next((k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            raise TrainingError(_diverged(cfg, step, f"the {name} hold NaN or infinite values ({bad})", path, saved))
    save_checkpoint(path, cfg, policy, ema.state_dict(), step,
                    TrainState(policy.state_dict(), optimizer.state_dict(), lr_sched.state_dict(), step,
                               _random_state(next(policy.parameters()).device)),
                    extra_meta={"elapsed_s": round(elapsed, 2), **meta})
    return step


def _random_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's random state at a step boundary (the noise levels, noise, dropout and crops of the steps
    to come), the device's own where it has one: a resumed run restores it."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _finite(loss: torch.Tensor, world: int) -> bool:
    """Whether every process's loss is finite (all processes agree, so all stop at the same step)."""
    ok = torch.isfinite(loss.detach()).to(torch.float32)
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _diverged(cfg: ExperimentConfig, step: int, what: str, last: Path, saved: int | None) -> str:
    kept = f"{last} keeps step {saved}" if saved is not None else "nothing was saved"
    return (f"step {step}: {what}, so training stopped ({kept}); the learning rate train.lr={cfg.train.lr:g} is the "
            f"likely cause: lower it (or lengthen train.warmup_steps) and run again")


def _log(path: Path, record: dict) -> None:
    """Append one line to train_log.jsonl; a non-finite number is written as null, so every line stays
    valid JSON (NaN and Infinity are not)."""
    with naming_errors(path), open(path, "a") as f:
        f.write(standard_json(record) + "\n")


def check_out(out: Path, dataset: str, fresh: bool = False) -> None:
    """Refuse a run directory that training could not write or that would put data at risk: a file; a
    folder inside a polcache dataset (writing that dataset again, `record --out`, replaces everything in
    it); the dataset itself or a folder inside it; a dataset where training replaces OUT/last or OUT/best;
    a folder there that is no checkpoint. A damaged checkpoint there (a truncated meta.json) is refused
    unless `fresh`, which moves it aside with the rest of the previous run."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out}: exists and is not a directory; give a run directory")
    if (why := unwritable(out / "last")) is not None:  # where the run's lock, log and checkpoints go
        raise ConfigError(f"out={out}: {why}; nothing was done")
    data = Path(dataset).resolve() if dataset else None
    if data is not None and data in (out.resolve(), *out.resolve().parents):
        where = "is dataset" if data == out.resolve() else "is inside dataset"
        raise ConfigError(f"out={out} {where} {data}: writing the dataset again would delete the run; give an out "
                          f"directory outside it")
    if (holder := enclosing_output(out)) is not None:
        raise ConfigError(f"out={out} is inside {holder[0]}, {holder[1]}: writing it again would delete the run; "
                          f"give an out directory outside it")
    run_files = ("last", "best", "train_log.jsonl")
    others = out.is_dir() and any(p.name != RUN_LOCK for p in out.iterdir())  # (a killed run may leave only its lock)
    if others and not any((out / f).exists() for f in run_files) \
            and not any(out.glob("previous-*")):  # e.g. out=configs, or the folder that holds the runs
        raise ConfigError(f"out={out} holds other files and no training run ({', '.join(run_files)}): give a new or "
                          f"empty folder, or an earlier run's")
    for sub in ("last", "best"):
        if data is not None and (data == (out / sub).resolve() or (out / sub).resolve() in data.parents):
            raise ConfigError(f"dataset {dataset} is inside {out / sub}, which training replaces; move the dataset "
                              f"or give another out directory")
        if (out / sub).exists():  # training replaces OUT/last and OUT/best: only ever an earlier checkpoint
            try:
                read_meta(out / sub)
            except CheckpointError as exc:
                if not any((out / sub / name).exists() for name in CHECKPOINT_FILES):  # one of them: a checkpoint
                    raise ConfigError(f"{out / sub} is not a polcache checkpoint, and training replaces it ({exc}); "
                                      f"move it or give another out directory") from None
                if not fresh:  # an earlier run's, damaged: --fresh moves it aside, as any previous run
                    raise ConfigError(f"{out / sub} is a damaged checkpoint ({exc}){FRESH_HINT} (the previous run "
                                      f"is moved into {out}/previous-*, nothing deleted)") from None


FRESH_MARK = ".fresh-aside"  # in OUT while a previous run is moved aside: names the folder it moves into
PREVIOUS_RUN = ("last", "best", "train_log.jsonl")


def _set_aside_previous_run(out: Path, why: str) -> None:
    """Move the previous run's checkpoints and log into OUT/previous-<time>/ (--fresh, or a new run
    where the previous one left no last/ to resume; `why` starts the line that says so), so the new run
    starts clean (its best/ is not judged against the old one's, its log has only its own lines) and
    nothing is deleted that the user may still want. The folder is named in OUT/.fresh-aside before
    anything moves, so a run killed between the moves is completed by the next (_finish_set_aside)
    instead of leaving last/ here and best/ there."""
    old = [p for p in (out / name for name in PREVIOUS_RUN) if p.exists()]
    if not old:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = out / f"previous-{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = out / f"previous-{stamp}-{n}"
    aside.mkdir()
    atomic_write_text(out / FRESH_MARK, aside.name + "\n")
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in old)
    _move_previous_run(out, aside)
    print(f"{why}: moved the previous run's {names} to {aside} (delete it if not needed)")


def _move_previous_run(out: Path, aside: Path) -> None:
    for name in PREVIOUS_RUN:
        if (out / name).exists():
            os.rename(out / name, aside / name)
    (out / FRESH_MARK).unlink()


def _finish_set_aside(out: Path) -> None:
    """Complete a move of the previous run aside that was killed midway (see _set_aside_previous_run)."""
    try:
        name = (out / FRESH_MARK).read_text().strip()
    except FileNotFoundError:
        return
    aside = out / name
    if not name or "/" in name or not aside.is_dir():
        raise CheckpointError(f"{out / FRESH_MARK} names no folder of the previous run ({name!r}); move "
                              f"{', '.join(PREVIOUS_RUN)} where you want them, delete the file, and run again")
    _move_previous_run(out, aside)
    print(f"moving the previous run aside was interrupted before: finished moving it to {aside}")


def _resume(last: Path, cfg: ExperimentConfig, policy: DiffusionPolicy, optimizer, lr_sched, ema: EMA,
            device: torch.device, verbose: bool = True, random: bool = True) -> tuple[int, float]:
    """Restore OUT/last into the new run's objects and return its step and the run's seconds until it
    was saved (0 for a checkpoint that does not record them). `random`: torch's random state too (one
    process's: with several, each keeps its own seed's, so their draws stay apart). The optimizer keeps the run's
    moment estimates but takes the command's hyper-parameters (train.lr, betas, weight_decay), which
    may have been changed to continue the run differently."""
    old_cfg, meta = read_meta(last)
    check_external_weights(meta, last)
    old_stats = read_tensors(last / "normalizer.safetensors", hint=FRESH_HINT, meta=meta)  # the data it learnt from
    if (other := _other_commands_run(old_stats, policy)) is not None:  # before any difference, all of them follow
        raise CheckpointError(f"cannot resume {last}: {other}; pass --fresh to start over (the previous run is moved "
                              f"aside) or use another out directory")
    changed = _changed_fields(to_dict(old_cfg.policy), to_dict(cfg.policy), "policy")
    if changed:
        raise CheckpointError(f"{last} was trained with a different policy config ({'; '.join(changed[:4])}); pass "
                              f"--fresh to start over or use another out directory")
    differences = _data_differences(old_stats, old_cfg, meta, cfg, policy) + _epoch_batch_difference(old_cfg, cfg)
    if differences:
        raise CheckpointError(f"cannot resume {last}: {'; '.join(differences)}; pass --fresh to start over "
                              f"(the previous run is moved aside) or use another out directory")
    if verbose and old_cfg.dataset and Path(old_cfg.dataset).resolve() != Path(cfg.dataset).resolve():
        print(f"note: the run was trained on {old_cfg.dataset}; {cfg.dataset} holds the same data (same statistics)")
    state = load_train_state(last, meta)
    if state is None:
        raise CheckpointError(f"{last} has no training state to resume from; pass --fresh to start over")
    averaged = read_tensors(last / "model.safetensors", device, FRESH_HINT, meta)
    if random and state.random is not None:  # saved at a step boundary: the steps to come draw what they drew before
        torch.set_rng_state(state.random["cpu"])
        if device.type == "cuda" and "cuda" in state.random:
            torch.cuda.set_rng_state(state.random["cuda"], device)
    policy.load_state_dict(state.model)
    ema.load_state_dict(averaged)
    optimizer.load_state_dict(state.optimizer)
    for name, value in (("betas", tuple(cfg.train.betas)), ("weight_decay", cfg.train.weight_decay)):
        had = optimizer.param_groups[0][name]
        if had != value:  # the command's, as for the learning rate below; the moment estimates stay the run's
            if verbose:
                print(f"note: train.{name}={json.dumps(value)} (the run had {json.dumps(had)})")
            for group in optimizer.param_groups:
                group[name] = value
    lr_sched.load_state_dict(state.lr_scheduler)
    if lr_sched.base_lrs[0] != cfg.train.lr:  # the command's learning rate (e.g. lowered after a divergence),
        if verbose:                           # at the schedule's position: the restored state would keep the old one
            print(f"note: learning rate train.lr={cfg.train.lr:g} (the run had {lr_sched.base_lrs[0]:g})")
        lr_sched.base_lrs = [cfg.train.lr] * len(lr_sched.base_lrs)
        for group, schedule in zip(optimizer.param_groups, lr_sched.lr_lambdas):
            group["initial_lr"], group["lr"] = cfg.train.lr, cfg.train.lr * schedule(lr_sched.last_epoch)
    return state.step, float(meta.get("elapsed_s", 0.0))


def _other_commands_run(old_stats: dict[str, torch.Tensor], policy: DiffusionPolicy) -> str | None:
    """Why a run whose normaliser holds `old_stats` is the other training command's (`train` end to end,
    `ptp finetune` a head on stored embeddings: its normaliser holds theirs), or None."""
    run_on_embeddings = any(k.split(".")[0] == EMBEDDING_KEY for k in old_stats)
    if run_on_embeddings == (EMBEDDING_KEY in policy.normalizer.keys):
        return None
    return ("the run's head was fine-tuned on stored embeddings: resume it with `polcache ptp finetune --embeddings "
            "STORE`" if run_on_embeddings else
            "the run was trained end to end by `polcache train`, not fine-tuned on stored embeddings")


def _changed_fields(old: dict, new: dict, prefix: str) -> list[str]:
    """'field is X, the run's is Y' for each config field (dotted) whose value differs."""
    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_fields(a, b, f"{prefix}.{key}")
        elif a != b:
            out.append(f"{prefix}.{key} is {json.dumps(b)}, the run's is {json.dumps(a)}")
    return out


def _epoch_batch_difference(old_cfg: ExperimentConfig, cfg: ExperimentConfig) -> list[str]:
    """A run measured in epochs counts its steps in batches of train.batch_size: resumed with another
    size, the step it saved would stand for another share of its epochs (at twice the size, a run
    stopped halfway would be "done"), and its learning-rate schedule would jump. A run measured in
    steps (train.epochs 0) keeps its length whatever the batch."""
    if cfg.train.epochs <= 0 or cfg.train.batch_size == old_cfg.train.batch_size:
        return []
    return [f"train.batch_size is {cfg.train.batch_size}, the run's is {old_cfg.train.batch_size} (a run measured in "
            f"train.epochs counts its steps and learning-rate schedule in batches of the size it was saved at: resume "
            f"with train.batch_size={old_cfg.train.batch_size})"]


def _rate_difference(meta: dict, cfg: ExperimentConfig, policy: DiffusionPolicy) -> list[str]:
    """The dataset's rate against the one the run's checkpoint records (meta.json `control_hz`, null
    where its data stated none; absent from checkpoints saved before it), either way round."""
    if "control_hz" not in meta:
        return []
    try:
        old_hz = check_control_hz(meta["control_hz"], "control_hz")
    except ValueError as exc:
        return [f"the run's meta.json {exc}"]
    if policy.spec.control_hz == old_hz:
        return []
    said = (f"is recorded at {policy.spec.control_hz:g} fps" if policy.spec.control_hz is not None
            else "states no rate (no fps attr)")
    acts = f"acts at {old_hz:g} Hz" if old_hz is not None else "was trained on data that states no rate"
    return [f"dataset {cfg.dataset} {said}, the run's policy {acts}"]


VALIDATION_SET = (("seed", "episodes"), ("val_fraction", "episodes"), ("val_windows", "windows"))


def _data_differences(old_stats: dict[str, torch.Tensor], old_cfg: ExperimentConfig, meta: dict, cfg: ExperimentConfig,
                      policy: DiffusionPolicy) -> list[str]:
    """What a resumed run would learn from that differs from what OUT/last was trained on: the task, the
    observation keys and shapes, the action size, the rate it was recorded at (the rate the checkpoint
    says its policy acts at), the data itself, as its normaliser statistics
    (fitted on it; a resumed run would switch to the new ones mid-run), and the settings that choose the
    validation episodes and windows (it would validate on episodes it trained on, and judge best/ on
    scores not comparable with the stored one). A dataset that was only moved (same statistics at
    another path) is the same data. `old_stats`: OUT/last's normaliser."""
    out = []
    if old_cfg.task != cfg.task:
        out.append(f"task is {cfg.task!r}, the run's is {old_cfg.task!r}")
    if list(meta.get("obs_keys", old_cfg.obs_keys)) != policy.obs_keys:
        out.append(f"obs_keys are {policy.obs_keys}, the run's are {meta.get('obs_keys', old_cfg.obs_keys)}")
    else:
        shapes = {k: list(v.shape) for k, v in policy.spec.obs.items()}
        old_shapes = {k: list(v.get("shape", ())) for k, v in meta.get("obs_spec", {}).items()}
        if shapes != old_shapes:
            out.append(f"observation shapes are {shapes}, the run's are {old_shapes}")
    if int(meta.get("action_dim", policy.action_dim)) != policy.action_dim:
        out.append(f"action size is {policy.action_dim}, the run's is {meta['action_dim']}")
    out += _rate_difference(meta, cfg, policy)
    differ = differing_keys(policy.normalizer.state_dict(), old_stats)
    modes = [f"train.{name} is {getattr(cfg.train, name)}, the run's is {getattr(old_cfg.train, name)}"
             for name in ("state_norm", "action_norm") if getattr(cfg.train, name) != getattr(old_cfg.train, name)]
    if modes:  # the statistics differ because the normalisation does, whatever the data
        out += [f"{m} (the normaliser is fitted with it)" for m in modes]
    elif differ:
        where = (f"dataset {cfg.dataset} is not the run's {old_cfg.dataset}"
                 if Path(old_cfg.dataset).resolve() != Path(cfg.dataset).resolve()
                 else f"dataset {cfg.dataset} changed since the run" if differ != ["embedding"]
                 else "the embeddings are not the run's (another embedding store, or another encoder)")
        out.append(f"{where} (the normaliser statistics of {', '.join(differ)} differ)")
    out += [f"train.{name} is {getattr(cfg.train, name)}, the run's is {getattr(old_cfg.train, name)} (it chooses "
            f"the validation {what})" for name, what in VALIDATION_SET
            if getattr(cfg.train, name) != getattr(old_cfg.train, name)]
    return out
