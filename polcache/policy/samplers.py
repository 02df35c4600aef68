"""Samplers as loops over precomputed coefficients.

DDPM, DDIM and Euler flow matching all reduce to the same per-step update:

    x0_hat = a[k] * x - b[k] * model_out        (optionally clipped to [-1, 1])
    x_next = c[k] * x0_hat + d[k] * x + e[k] * model_out + s[k] * noise[k]

so the denoising loop never knows which sampler it serves, and the only per-step work
is four multiply-adds. The noise schedules themselves come from diffusers (its
DDPMScheduler/DDIMScheduler define alphas_cumprod and the inference timesteps); we
precompute their step rules into tables because diffusers' `step()` costs ~0.3 ms per
call on our CPUs, which is a large share of a cached denoising step. Tests check that
the tables reproduce diffusers' `step()` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from polcache.config import SAMPLER_KINDS, SamplerConfig
from polcache.errors import ConfigError

FLOW_TIME_SCALE = 1000.0  # flow time t in [0, 1] is fed to the model as t * 1000, like DDPM's 0..999


@dataclass
class Sampler:
    """Per-step coefficient tables for one sampler at one step count K."""

    kind: str
    timesteps: torch.Tensor  # (K,) float: what the denoiser is conditioned on at step k
    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    d: torch.Tensor
    e: torch.Tensor
    s: torch.Tensor
    clip_sample: bool

    def __post_init__(self) -> None:
        # Python floats: multiplying by a float is cheaper than by an indexed 0-d tensor.
        self._coef = list(zip(*(getattr(self, n).tolist() for n in ("a", "b", "c", "d", "e", "s"))))
        self.timestep_values: list[float] = self.timesteps.tolist()  # read without a device sync (graph capture)
        self._fused = None  # set by `fused()`

    def fused(self) -> "Sampler":
        """A copy whose update is one compiled kernel (torch.compile) instead of up to six: on a
        GPU, where a cached denoising step is bound by kernel launches, the update is a large
        share of it. Coefficients become one (6,) tensor per step (own storage, so every step
        reuses the one compiled graph)."""
        dev = self.timesteps.device
        out = self.to(dev)
        out._coef_t = [torch.tensor(row, dtype=torch.float32, device=dev) for row in self._coef]
        clip = self.clip_sample

        def update(x, model_out, noise, coef):
            a, b, c, d, e, s = coef.unbind()
            x0 = a * x - b * model_out
            if clip:
                x0 = x0.clamp(-1.0, 1.0)
            return c * x0 + d * x + e * model_out + s * noise

        # dynamic=None: a second batch size compiles one kernel for all of them (a server warms up
        # batch sizes 1..8; one compiled kernel per size would pass dynamo's recompile limit)
        out._fused = torch.compile(update, dynamic=None, fullgraph=True)
        return out

    @property
    def is_fused(self) -> bool:
        return self._fused is not None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def needs_noise(self) -> bool:
        return bool((self.s > 0).any())

    def update(self, k: int, x: torch.Tensor, model_out: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        if self._fused is not None:
            return self._fused(x, model_out, x if noise is None else noise, self._coef_t[k])
        a, b, c, d, e, s = self._coef[k]
        # zero terms are skipped (DDPM has no e, DDIM no d, flow no x0): each is a kernel on a GPU
        out = None
        if c:
            x0 = torch.add(x * a, model_out, alpha=-b)
            if self.clip_sample:
                x0 = x0.clamp_(-1.0, 1.0)
            out = x0 * c
        if d:
            out = x * d if out is None else out.add_(x, alpha=d)
        if e:
            out = model_out * e if out is None else out.add_(model_out, alpha=e)
        if out is None:
            out = torch.zeros_like(x)
        if noise is not None and s > 0:
            out = out.add_(noise, alpha=s)
        return out

    def to(self, device: torch.device | str) -> "Sampler":
        t = {n: getattr(self, n).to(device) for n in ("timesteps", "a", "b", "c", "d", "e", "s")}
        return Sampler(kind=self.kind, clip_sample=self.clip_sample, **t)


def diffusers_scheduler(cfg: SamplerConfig, kind: str | None = None):
    """The diffusers scheduler defining our noise schedule (used for training and as reference)."""
    kind = kind or cfg.kind
    common = dict(
        num_train_timesteps=cfg.train_steps,
        beta_schedule=cfg.beta_schedule,
        clip_sample=cfg.clip_sample,
        prediction_type="epsilon",
    )
    if kind == "ddpm":
        return DDPMScheduler(variance_type="fixed_small", **common)
    if kind == "ddim":
        return DDIMScheduler(set_alpha_to_one=True, steps_offset=0, **common)
    raise ConfigError(f"sampler kind {kind!r} has no diffusers scheduler (expected ddpm or ddim)")


def make_sampler(cfg: SamplerConfig, kind: str | None = None, steps: int | None = None,
                 what: str = "steps") -> Sampler:
    """Build the coefficient tables for `kind` (default cfg.kind) with `steps` inference steps;
    `what` names where a given `steps` came from in an error (a keyword, or a command's --steps)."""
    kind = kind or cfg.kind
    if kind not in SAMPLER_KINDS:
        raise ConfigError(f"unknown sampler {kind!r}: expected one of {', '.join(SAMPLER_KINDS)}")
    name = "policy.sampler.inference_steps" if steps is None else what
    steps = int(cfg.inference_steps if steps is None else steps)
    most, why = ((MAX_FLOW_STEPS, "Euler steps: memory grows with them") if kind == "flow"
                 else (cfg.train_steps, "one per noise level trained, policy.sampler.train_steps"))
    if not 1 <= steps <= most:
        sep = " " if name.startswith("-") else "="  # a command-line option or a keyword / config key
        raise ConfigError(f"{name}{sep}{steps}: {kind} takes 1..{most} inference steps ({why})")
    if kind == "flow":
        return _flow_sampler(steps)
    sched = diffusers_scheduler(cfg, kind)
    sched.set_timesteps(steps)
    ts = sched.timesteps.long()
    ac = sched.alphas_cumprod.double()
    one = torch.tensor(1.0, dtype=torch.float64)
    cols = {n: [] for n in "abcdes"}
    for i, t in enumerate(ts.tolist()):
        prev_t = ts[i + 1].item() if i + 1 < len(ts) else -1
        a_t = ac[t]
        a_prev = ac[prev_t] if prev_t >= 0 else one
        cols["a"].append(1.0 / a_t.sqrt())
        cols["b"].append((1.0 - a_t).sqrt() / a_t.sqrt())
        if kind == "ddpm":
            beta = 1.0 - a_t / a_prev
            cols["c"].append(a_prev.sqrt() * beta / (1.0 - a_t))
            cols["d"].append((1.0 - beta).sqrt() * (1.0 - a_prev) / (1.0 - a_t))
            var = ((1.0 - a_prev) / (1.0 - a_t) * beta).clamp(min=1e-20)
            cols["e"].append(torch.tensor(0.0, dtype=torch.float64))
            cols["s"].append(var.sqrt() if prev_t >= 0 else torch.tensor(0.0, dtype=torch.float64))
        else:  # DDIM, eta = 0, diffusers' default of stepping with the unclipped epsilon
            cols["c"].append(a_prev.sqrt())
            cols["d"].append(torch.tensor(0.0, dtype=torch.float64))
            cols["e"].append((1.0 - a_prev).sqrt())
            cols["s"].append(torch.tensor(0.0, dtype=torch.float64))
    tab = {n: torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in vs]).float() for n, vs in cols.items()}
    return Sampler(kind=kind, timesteps=ts.float(), clip_sample=cfg.clip_sample, **tab)


MAX_FLOW_STEPS = 1000  # Euler steps; memory grows with K (100000 ran a 23 GB machine out of memory)


def _flow_sampler(steps: int) -> Sampler:
    """Euler integration of a rectified-flow velocity v = noise - x0 from t=1 (noise) to t=0 (data)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    t_now, t_next = t[:-1], t[1:]
    zeros = torch.zeros(steps)
    return Sampler(
        kind="flow",
        timesteps=(t_now * FLOW_TIME_SCALE).float(),
        a=zeros,
        b=zeros,
        c=zeros,
        d=torch.ones(steps),
        e=(t_next - t_now).float(),
        s=zeros,
        clip_sample=False,
    )


class TrainingNoise:
    """Forward process for training: corrupt clean actions and give the regression target."""

    def __init__(self, cfg: SamplerConfig, objective: str):
        self.objective = objective
        self.train_steps = cfg.train_steps
        if objective == "epsilon":
            self.alphas_cumprod = diffusers_scheduler(cfg, "ddpm").alphas_cumprod.float()

    def corrupt(self, x0: torch.Tensor, generator: torch.Generator | None = None):
        """Returns (x_t, timestep fed to the model (B,), target)."""
        B = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.objective == "epsilon":
            t = torch.randint(0, self.train_steps, (B,), generator=generator, device=x0.device)
            ac = self.alphas_cumprod.to(x0.device)[t].view(B, *([1] * (x0.dim() - 1)))
            xt = ac.sqrt() * x0 + (1.0 - ac).sqrt() * noise
            return xt, t.float(), noise
        tf = torch.rand((B,), generator=generator, device=x0.device, dtype=x0.dtype)
        tb = tf.view(B, *([1] * (x0.dim() - 1)))
        xt = tb * noise + (1.0 - tb) * x0
        return xt, tf * FLOW_TIME_SCALE, noise - x0
