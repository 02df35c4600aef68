"""Exponential moving average of weights, with diffusion_policy's warm-up of the decay
(decay grows as 1 - (1 + step / warmup)^-1 ... capped at the configured value), so early
averages are not dominated by the random initialisation. Only trained parameters are averaged;
the rest (buffers, a frozen encoder's weights) is copied as it is: averaging a constant rounds it,
and PTP fine-tuning's frozen encoder came out of it 1e-8 away from the one its embeddings are of."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: int):
        self.decay = decay
        self.warmup = max(1, warmup)
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # what training changes, as built (PTP's encoder is frozen before): once, not at every step
        self.trained = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}

    def current_decay(self, step: int) -> float:
        return min(self.decay, 1.0 - 1.0 / (1.0 + step / self.warmup))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.current_decay(step)
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if k in self.trained:
                s.mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}
