"""The learning-rate schedule: a pure function of the loop's step counter, set before every update.

The paper's step decay, ``lr * decay_gamma ** (step // decay_steps)``, times an optional linear warm-up over
the first ``optim.warmup_steps`` updates. It is ours, not DeepSpeed's, for three reasons: it counts the
loop's steps, skipped ones included, so a skipped update moves it the same way on every ZeRO stage
(DeepSpeed's scheduler advances on a ZeRO-0 skip but not on a ZeRO-1/2 one); nothing restored from a
checkpoint (the param groups' lr, a scheduler's state) can override it, so a new ``optim.lr`` or decay
given on resume applies from the first resumed step; and the logged lr is the formula's, not a readback.
"""

from __future__ import annotations

from samdiffsr.config import OptimConfig


def lr_at(optim: OptimConfig, step: int) -> float:
    """The lr of the update that follows ``step`` completed steps (also what is logged after step ``step``).

    ``lr * decay_gamma ** (step // decay_steps)``, times ``(step + 1) / warmup_steps`` while
    ``step + 1 < warmup_steps``: the first update uses ``lr / warmup_steps``, update ``warmup_steps`` the full lr.
    """
    lr = optim.lr * optim.decay_gamma ** (step // optim.decay_steps)  # the same float ops as LambdaLR's
    if step + 1 < optim.warmup_steps:
        lr = lr * (step + 1) / optim.warmup_steps
    return lr
