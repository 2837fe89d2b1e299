"""What a resume does with each config key given another value than the checkpoint's: applied, applied with
a conversion, or refused in one line. The table in docs/training.md ("Resume: the contract") is
:data:`CONTRACT`, row by row (tests/test_resume_contract.py holds them equal).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from samdiffsr.config import Config, config_from_dict

APPLIED, CONVERTED, REFUSED = "applied", "converted", "refused"

# "section.key" (or "section.*": every key of the section; "ranks": the number of ranks) -> (what, how).
CONTRACT: dict[str, tuple[str, str]] = {
    "model.*": (REFUSED, "the weights' shapes, and the diffusion they were trained for"),
    "train.task": (REFUSED, "another network and objective"),
    "train.freeze_rrdb": (REFUSED, "another set of trained parameters, so another optimizer state"),
    "ranks": (CONVERTED, "optimizer state from `optimizer_full.pt`; data at the next epoch; diffusion RNG "
                         "reseeded from (seed, rank, step)"),
    "train.zero_stage": (CONVERTED, "optimizer state from `optimizer_full.pt` (DeepSpeed's own files resume "
                                    "only the same ranks and stage)"),
    "train.channels_last": (CONVERTED, "Adam's moments are given their parameters' memory layout"),
    "train.precision": (CONVERTED, "weights and Adam state are fp32 in every precision; fp16's loss scale is "
                                   "kept fp16 -> fp16, starts at the initial scale on entering fp16, is "
                                   "dropped on leaving it"),
    "train.seed": (CONVERTED, "data at the next epoch, in the new seed's order; the diffusion RNG continues "
                              "from its saved state (same ranks)"),
    "train.batch_size": (APPLIED, "from the first resumed step; data at the next epoch when the micro batch "
                                  "changes"),
    "train.grad_accum": (APPLIED, "from the first resumed step; data at the next epoch when the micro batch "
                                  "changes"),
    "train.ema_decay": (APPLIED, "the saved average continues with the new decay; 0 -> d starts it from the "
                                 "loaded weights; d -> 0 drops it"),
    "train.ema_warmup_power": (APPLIED, "the warm-up continues from the saved count of applied updates"),
    "train.snr_gamma": (APPLIED, "the loss weighting from the first resumed step"),
    "train.timestep_sampling": (APPLIED, "from the first resumed step"),
    "train.timestep_power": (APPLIED, "from the first resumed step"),
    "train.rrdb_ckpt": (APPLIED, "not read: the checkpoint holds the frozen RRDB"),
    "train.compile": (APPLIED, "parameter names stay the same"),
    "train.run_dir": (APPLIED, "a checkpoint of another run folder continues into this one"),
    "train.resume": (APPLIED, "an older checkpoint of the same run folder is a rollback: the newer ones are "
                              "moved aside"),
    "train.max_steps": (APPLIED, ""),
    "train.ckpt_every": (APPLIED, ""),
    "train.keep_last": (APPLIED, "retention counts back from `latest`"),
    "train.keep_every": (APPLIED, "retention counts back from `latest`"),
    "train.log_every": (APPLIED, ""),
    "train.val_every": (APPLIED, ""),
    "train.val_crop": (APPLIED, ""),
    "train.val_steps": (APPLIED, ""),
    "train.val_sampler": (APPLIED, ""),
    "train.val_eta": (APPLIED, ""),
    "train.max_bad_steps": (APPLIED, ""),
    "optim.lr": (APPLIED, "the lr is a function of the step and `optim.*`, set before every update"),
    "optim.decay_steps": (APPLIED, "the lr is a function of the step and `optim.*`, set before every update"),
    "optim.decay_gamma": (APPLIED, "the lr is a function of the step and `optim.*`, set before every update"),
    "optim.warmup_steps": (APPLIED, "the lr is a function of the step and `optim.*`, set before every update"),
    "optim.betas": (APPLIED, "set into Adam's param groups after loading (a checkpoint's are not kept)"),
    "optim.weight_decay": (APPLIED, "set into Adam's param groups after loading (a checkpoint's are not kept)"),
    "optim.grad_clip": (APPLIED, "DeepSpeed's config"),
    "data.train_shards": (CONVERTED, "data at the next epoch"),
    "data.workers": (CONVERTED, "data at the next epoch"),
    "data.shuffle_buffer": (CONVERTED, "data at the next epoch"),
    "data.resampled": (CONVERTED, "data at the next epoch"),
    "data.samples_per_epoch": (CONVERTED, "data at the next epoch"),
    "data.crops_per_tile": (CONVERTED, "data at the next epoch"),
    "data.patch_size": (CONVERTED, "data at the next epoch"),
    "data.hflip": (APPLIED, "from the next batch"),
    "data.vflip": (APPLIED, "from the next batch"),
    "data.rot90": (APPLIED, "from the next batch"),
    "data.prefetch_factor": (APPLIED, ""),
    "data.cache_dir": (APPLIED, ""),
    "data.val_shards": (APPLIED, ""),
    "data.val_images": (APPLIED, ""),
    "deepspeed": (APPLIED, "merged over what `train.*` / `optim.*` derive (a key that disagrees with them is "
                           "refused by config validation)"),
}
# The keys the data order depends on besides the number of ranks and the micro batch: a change continues
# the data at the start of the next epoch, so that no sample of the current epoch is seen twice.
ORDER_KEYS = tuple(k for k, (what, how) in CONTRACT.items() if "data at the next epoch" in how
                   and k not in ("ranks", "train.batch_size", "train.grad_accum"))


def contract_of(key: str) -> tuple[str, str]:
    """The row of ``key`` ("section.key"), the section's ``section.*`` row when it has one."""
    return CONTRACT.get(key) or CONTRACT[key.split(".")[0] + ".*"]


def config_keys(cfg: Config | None = None) -> list[str]:
    """Every key of the config schema as "section.key" ("deepspeed" for the free-form section)."""
    cfg = cfg or Config()
    keys = ["deepspeed"]
    for section in ("model", "data", "optim", "train"):
        keys += [f"{section}.{f.name}" for f in fields(getattr(cfg, section))]
    return keys


def _value(cfg: Config, key: str) -> Any:
    if key == "deepspeed":
        return cfg.deepspeed
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def changed_keys(saved: dict[str, Any], cfg: Config) -> tuple[Config, list[str]]:
    """The checkpoint's config and the keys whose value differs in ``cfg``.

    Raises ``ValueError`` naming the refused keys (in one line) when any of them changed.
    """
    old = config_from_dict(saved)
    changed = [k for k in config_keys(cfg) if _value(old, k) != _value(cfg, k)]
    refused = [k for k in changed if contract_of(k)[0] == REFUSED]
    if refused:
        raise ValueError(f"the checkpoint was trained with other {', '.join(refused)} "
                         f"({'; '.join(f'{k}: {_value(old, k)!r} -> {_value(cfg, k)!r}' for k in refused)[:300]})"
                         "; a checkpoint continues only the same model, task and trained parameters")
    return old, changed
