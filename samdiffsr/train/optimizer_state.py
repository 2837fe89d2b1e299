"""Adam's state independent of the number of ranks, the ZeRO stage and the memory layout.

A checkpoint carries, besides DeepSpeed's own files (which resume only the same world size and ZeRO stage),
``optimizer_full.pt``: per trainable parameter name, Adam's ``exp_avg`` and ``exp_avg_sq`` in the parameter's
shape (default layout, fp32) and Adam's step. :func:`full_state` gathers it (a collective under ZeRO 1/2);
:func:`set_full_state` puts it into a freshly built engine of any world size and stage. About 2 x 4 bytes per
trainable parameter (~100 MB for the full SAM-DiffSR UNet).

The ZeRO internals this needs, for want of a public way (checked with deepspeed 0.19.8; recheck on upgrade):
``engine.basic_optimizer`` is the torch Adam that ZeRO 1/2 step on their flat fp32 partitions, and the
per-parameter views into its state (which ``deepspeed.utils.safe_{get,set}_full_optimizer_state`` use) are
linked lazily, after the first step, by ``engine.optimizer._lazy_init_hp_params_optimizer_state()``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

FULL_STATE = "optimizer_full.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")


def match_param_layouts(optimizer: torch.optim.Optimizer) -> int:
    """Give every state tensor of ``optimizer`` its parameter's memory layout, values unchanged.

    Fused Adam pairs a parameter with its moments by memory position. A checkpoint written with
    ``train.channels_last`` toggled the other way restores the moments in the other layout (torch's
    ``load_state_dict`` keeps the saved strides), and each weight would be updated with another weight's
    moments. Returns the number of tensors re-laid out.
    """
    changed = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
                    changed += 1
    return changed


def _zero_partitioned(engine: Any) -> bool:
    return engine.zero_optimization_stage() in (1, 2)


def full_state(engine: Any, named: Iterable[tuple[str, nn.Parameter]], keep: bool = True) -> dict[str, Any]:
    """Adam's state per parameter name, on the CPU, in the parameters' shapes (default layout).

    Collective under ZeRO 1/2: every rank calls it, the ranks with ``keep`` false get no tensors back.
    Step 0 and no tensors when no update was applied yet (Adam's state is created at its first step).
    """
    optimizer = engine.basic_optimizer
    if not optimizer.state:
        return {"step": 0, **{key: {} for key in MOMENTS}}
    out: dict[str, Any] = {key: {} for key in MOMENTS}
    if _zero_partitioned(engine):
        from deepspeed.utils import safe_get_full_optimizer_state

        engine.optimizer._lazy_init_hp_params_optimizer_state()  # a no-op once the first step linked them
        for name, p in named:
            for key in MOMENTS:
                value = safe_get_full_optimizer_state(p, key)  # an all-reduce over the ranks
                if keep:
                    out[key][name] = value.detach().float().cpu().contiguous()
        steps = [state["step"] for state in optimizer.state.values()]
    else:
        steps = []
        for name, p in named:
            state = optimizer.state.get(p)
            if state is None:  # a parameter that never had a gradient: Adam has nothing for it
                continue
            for key in MOMENTS:
                out[key][name] = state[key].detach().float().cpu().contiguous()
            steps.append(state["step"])
    out["step"] = int(max(float(s) for s in steps))  # one value: every parameter steps together here
    return out


def set_full_state(engine: Any, named: Iterable[tuple[str, nn.Parameter]], full: dict[str, Any]) -> None:
    """Put ``full`` (from :func:`full_state`, any world size and stage) into ``engine``'s Adam.

    The engine must be fresh (no step yet) and hold the checkpoint's weights already (under ZeRO 1/2 the fp32
    master partitions too: ``load_checkpoint(load_module_only=True)`` refreshes them from the weights).
    """
    named = list(named)
    missing = [n for n, _ in named if full["step"] > 0 and n not in full["exp_avg"]]
    if missing:
        raise KeyError(f"the saved optimizer state lacks {len(missing)} trainable parameter(s), e.g. {missing[0]}")
    if full["step"] == 0:
        return  # Adam never stepped: a fresh optimizer is the same thing
    optimizer = engine.basic_optimizer

    def step() -> torch.Tensor:  # one tensor per parameter: Adam increments each in place
        return torch.tensor(float(full["step"]))

    if _zero_partitioned(engine):
        from deepspeed.utils import safe_set_full_optimizer_state

        # Zeroed state for each flat fp32 partition, linked to the parameters, then filled fragment by
        # fragment (each rank keeps the part of every parameter that falls into its partition).
        _load_states(optimizer, lambda flat: {"step": step(), **{k: torch.zeros_like(flat) for k in MOMENTS}})
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
        for name, p in named:
            for key in MOMENTS:
                safe_set_full_optimizer_state(p, full[key][name].to(p.device), key)
    else:
        by_param = {id(p): name for name, p in named}

        def state_of(p: torch.Tensor) -> dict[str, Any]:
            name = by_param[id(p)]
            return {"step": step(), **{k: torch.empty_like(p).copy_(full[k][name]) for k in MOMENTS}}

        _load_states(optimizer, state_of)
        match_param_layouts(optimizer)


def _load_states(optimizer: torch.optim.Optimizer, state_of: Any) -> None:
    """Replace ``optimizer``'s state through torch's own ``load_state_dict`` (which puts ``step`` where the
    fused kernel wants it); the param groups' settings stay the current ones."""
    saved = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved["state"] = {i: state_of(p) for i, p in enumerate(params)}
    optimizer.load_state_dict(saved)
