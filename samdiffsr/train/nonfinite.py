"""Non-finite losses and fp16's loss scale: the optimizer update is skipped, the skips are counted.

A NaN/Inf loss on any rank skips the update on every rank without a host sync: the flag is all-reduced on
the device and handed to the fused Adam kernel as ``found_inf`` (the mechanism torch's GradScaler uses).
Under fp16 the GradScaler finds non-finite gradients itself and backs its scale off instead. Every update
that was not applied, for whichever reason, counts as a skipped step (``train.max_bad_steps``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from samdiffsr.cli import EXIT_FAILED, UserError


class NonFiniteLossError(UserError, RuntimeError):
    """Too many optimizer updates in a row were skipped: an expected failure, one line and exit 4."""

    exit_code = EXIT_FAILED


class GuardedUpdate:
    """DeepSpeed's boundary ``engine.step()``, skipped after a non-finite loss; fp16's loss scale.

    The only code that touches DeepSpeed or torch internals, each for want of a public way (checked with
    deepspeed 0.19.8 and torch 2.14.1; recheck them when either is upgraded):

    - ``engine.torch_autocast_z0_gradscaler`` (ZeRO 0) and ``engine.optimizer.torch_autocast_gradscaler``
      (ZeRO 1-3): the GradScaler of DeepSpeed's ``torch_autocast`` fp16 mode, which DeepSpeed neither
      exposes nor checkpoints (its state goes into our client state: :meth:`state_dict`).
    - ``engine.basic_optimizer.found_inf``: the attribute torch's fused Adam passes to its kernel, which
      leaves parameters and optimizer state untouched where it is nonzero: a skip decided on the device.
    - ``engine.basic_optimizer.param_groups`` (the lr, set before each update) and ``engine.optimizer.clip_grad``
      (ZeRO 1/2 load it from a checkpoint; set from ``optim.grad_clip`` so that a change on resume applies).
    - ``scaler._scale``: the loss scale as a device tensor (``get_scale()`` waits for the device). A scale
      lower after the step than before means the scaler skipped the update; gradients are divided by it
      for the logged norm.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.scaler = engine.torch_autocast_z0_gradscaler or getattr(engine.optimizer, "torch_autocast_gradscaler",
                                                                     None)

    def step(self, skipped: torch.Tensor, lr: float) -> torch.Tensor:
        """The boundary step with learning rate ``lr``, skipped when ``skipped`` (a 0-d bool device tensor, the
        same on every rank).

        Returns whether the update was applied, as a 0-d bool device tensor: not after a non-finite loss, a
        backed-off fp16 loss scale or DeepSpeed's own skip (ZeRO 1/2 on non-finite gradients).
        """
        engine, scaler = self.engine, self.scaler
        # Set before every update (train/schedule.py): nothing restored from a checkpoint overrides it. The
        # basic optimizer's groups are the ones stepped on every stage (ZeRO 1/2 step it on their partitions).
        for group in engine.basic_optimizer.param_groups:
            group["lr"] = lr
        if hasattr(engine.optimizer, "clip_grad"):  # ZeRO 1/2 restore clip_grad from a checkpoint: ours wins
            engine.optimizer.clip_grad = engine.gradient_clipping()
        if scaler is None:  # (under fp16 the GradScaler sets found_inf itself, from the gradients)
            engine.basic_optimizer.found_inf = skipped.float()
        scale_before = scaler._scale.clone() if scaler is not None else None
        if not engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed's micro-step count is out of step with the loop")
        engine.step()  # the boundary: gradients are reduced, clipped and applied (unless found_inf)
        applied = ~skipped
        if scaler is not None:  # a backed-off loss scale means the scaler skipped the update
            applied &= scaler._scale.reshape(()) >= scale_before.reshape(())
        if not engine.was_step_applied():  # DeepSpeed's own skip (ZeRO 1/2 on NaN gradients)
            applied = torch.zeros_like(applied)
        return applied

    def grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Global gradient 2-norm before clipping, unscaled (ZeRO 0: every rank holds the reduced gradients)."""
        norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        return norm / self.scaler._scale.reshape(()) if self.scaler is not None else norm

    def loss_scale(self) -> float | None:
        """The fp16 loss scale (a host sync); None without a GradScaler."""
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


class NonFiniteSteps:
    """Skipped steps in total and in a row, counted on the device and read at log intervals only."""

    def __init__(self, device: torch.device) -> None:
        self.total = torch.zeros((), dtype=torch.long, device=device)
        self.in_a_row = torch.zeros_like(self.total)
        self.longest = torch.zeros_like(self.total)  # the longest run of skips in this log interval
        self.longest_end = torch.zeros_like(self.total)  # the step that ended it

    def count(self, step: int, skipped: torch.Tensor) -> None:
        """Step number ``step`` (just done) was ``skipped`` or not."""
        self.in_a_row = (self.in_a_row + 1) * skipped
        self.longest_end = torch.where(self.in_a_row > self.longest, step, self.longest_end)
        self.longest = torch.maximum(self.longest, self.in_a_row)
        self.total += skipped

    def check(self, step: int, limit: int, save: Callable[[], str] | None = None) -> None:
        """At the end of a log interval (a host sync): raise when ``limit`` skips came in a row, else start
        the next interval.

        ``save`` (collective: every rank gets the same counts, so all raise together) writes a checkpoint of
        the current step, whose weights are those of the last good step, and returns the advice naming it.
        """
        if int(self.longest) >= limit:
            n, end = int(self.longest), int(self.longest_end)
            advice = save() if save is not None else "lower optim.lr or check the data, then rerun to resume"
            raise NonFiniteLossError(
                f"{n} optimizer steps in a row were skipped for a NaN/Inf loss or gradients (steps {end - n + 1} "
                f"to {end}; limit train.max_bad_steps={limit}); the weights are those of the last good step: "
                f"{advice}")
        self.longest, self.longest_end = self.in_a_row.clone(), torch.full_like(self.longest_end, step)


def rerun_advice(lr: float, resume_setting: str, tag_dir: Path) -> str:
    """What to rerun after a non-finite stop: half the lr, resuming from ``tag_dir`` (just saved).

    The lr schedule is a function of optim.lr and the step (train/schedule.py), so a new optim.lr applies
    from the first resumed step. An explicit ``train.resume`` (or ``never``) would not find this checkpoint:
    then the advice names it.
    """
    resume = "" if resume_setting in ("auto", "must") else f" train.resume={tag_dir}"
    return (f"rerun the same command with optim.lr={lr / 2:g}{resume} (or check the data): it resumes from "
            f"{tag_dir}")
