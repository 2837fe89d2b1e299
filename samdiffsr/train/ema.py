"""Exponential moving average of the trainable weights, in fp32, updated without host syncs.

``update(weight)`` takes the interpolation weight as a device tensor: the training step passes
``(1 - decay) * applied``, where ``applied`` is 0 when the optimizer step was skipped (non-finite loss,
fp16 overflow). A skipped step then leaves the EMA untouched, and no ``.item()`` is needed to know it.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """fp32 shadow copies of the parameters that require grad (the frozen RRDB is not averaged)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self._params]

    @torch.no_grad()
    def update(self, weight: torch.Tensor) -> None:
        """shadow += weight * (param - shadow); ``weight`` is a 0-d tensor on the parameters' device."""
        diffs = torch._foreach_sub([p.float() for p in self._params], self.shadow)
        torch._foreach_mul_(diffs, weight)
        torch._foreach_add_(self.shadow, diffs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s.detach().cpu().clone() for n, s in zip(self.names, self.shadow, strict=True)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.names):
            missing, extra = sorted(set(self.names) - set(state)), sorted(set(state) - set(self.names))
            raise KeyError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, shadow in zip(self.names, self.shadow, strict=True):
            shadow.copy_(state[name])

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with the averaged values in place of the trainable parameters."""
        averaged = dict(zip(self.names, self.shadow, strict=True))
        return {k: averaged.get(k, v).detach().cpu().clone() for k, v in model.state_dict().items()}
