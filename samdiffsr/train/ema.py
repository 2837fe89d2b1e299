"""Exponential moving average of the trainable weights, in fp32, updated without host syncs.

``update(weight)`` takes the interpolation weight as a device tensor: the training step passes
``(1 - decay) * applied``, where ``applied`` is 0 when the optimizer step was skipped (non-finite loss,
fp16 overflow). A skipped step then leaves the EMA untouched, and no ``.item()`` is needed to know it.

Warm-up (``warmup_power`` p > 0, diffusers' ``EMAModel(use_ema_warmup=True, power=p)`` without its inv_gamma):
the t-th applied update (t = 0, 1, ...) uses decay_t = min(decay, 1 - (1 + t)^-p), so the first copies the
weights and the average then lengthens until it reaches ``decay``. t counts applied updates only (a skipped
step does not advance it) and is saved in the state dict, so a resume continues the warm-up where it was.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """fp32 shadow copies of the parameters that require grad (the frozen RRDB is not averaged)."""

    UPDATES_KEY = "_ema_updates"  # the applied-update counter's entry in the state dict (no parameter's name)

    def __init__(self, model: nn.Module, decay: float, warmup_power: float = 0.0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if not warmup_power >= 0.0:
            raise ValueError(f"EMA warm-up power must be >= 0, got {warmup_power}")
        self.decay, self.warmup_power = decay, warmup_power
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self._params]
        device = self._params[0].device if self._params else torch.device("cpu")
        self.updates = torch.zeros((), dtype=torch.int64, device=device)  # applied updates so far (t)

    def current_decay(self) -> torch.Tensor:
        """decay_t for the next applied update: ``decay``, or min(decay, 1 - (1 + t)^-p) while warming up."""
        if not self.warmup_power:
            return torch.tensor(self.decay, dtype=torch.float64, device=self.updates.device)
        warm = 1.0 - (1.0 + self.updates.double()) ** -self.warmup_power
        return warm.clamp(max=self.decay)

    @torch.no_grad()
    def step(self, applied: torch.Tensor) -> None:
        """The EMA update after one optimizer step; ``applied`` (0-d bool) is False when the step was skipped."""
        if self.warmup_power:
            self.update((1.0 - self.current_decay()).float() * applied.float())
        else:  # the constant decay, computed exactly as before the warm-up existed
            self.update((1.0 - self.decay) * applied.float())
        self.updates += applied.long()

    @torch.no_grad()
    def update(self, weight: torch.Tensor) -> None:
        """shadow += weight * (param - shadow); ``weight`` is a 0-d tensor on the parameters' device."""
        diffs = torch._foreach_sub([p.float() for p in self._params], self.shadow)
        torch._foreach_mul_(diffs, weight)
        torch._foreach_add_(self.shadow, diffs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {n: s.detach().cpu().clone() for n, s in zip(self.names, self.shadow, strict=True)}
        return {**state, self.UPDATES_KEY: self.updates.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor], updates_if_absent: int = 0) -> None:
        """Load shadows and counter; a state saved before the counter existed counts ``updates_if_absent``."""
        state = dict(state)
        self.updates.fill_(int(state.pop(self.UPDATES_KEY, updates_if_absent)))
        if set(state) != set(self.names):
            missing, extra = sorted(set(self.names) - set(state)), sorted(set(state) - set(self.names))
            raise KeyError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, shadow in zip(self.names, self.shadow, strict=True):
            shadow.copy_(state[name])

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with the averaged values in place of the trainable parameters."""
        averaged = dict(zip(self.names, self.shadow, strict=True))
        return {k: averaged.get(k, v).detach().cpu().clone() for k, v in model.state_dict().items()}
