"""What an ablation runs: arms (a name and config overrides) x seeds, each a training run and a benchmark sweep.

Arm ``k`` with seed ``s`` trains with ``[*shared overrides, *arm k's overrides, train.seed=s]`` in
``OUT/runs/<arm>/seed<s>``, so every arm with seed ``s`` starts from the same initial weights and (the stream
being a pure function of seed, epoch, rank and world size) sees the same batches; the overrides are the only
difference. Every run is scored in ``OUT/bench/<arm>/seed<s>`` on the same sets with the same sampler seed.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from samdiffsr.cli import UserError
from samdiffsr.config import Config, load_config

_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# An override starts where a comma is followed by a dotted key and '=' (list values keep their commas).
_OVERRIDE_START = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_.]*=)")
# Keys an arm may not set: the ablation owns them (pairing, and where each run lives).
RESERVED = ("train.seed", "train.run_dir")
# Keys that change what each step's batch holds: an arm that sets one is not paired by data.
DATA_KEYS = ("data.", "train.batch_size", "train.grad_accum")


class AblationSpecError(UserError):
    """A bad --arm, --seeds or --sets; the message names it."""


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...] = ()


def parse_arm(text: str) -> Arm:
    """``NAME=`` (the config as is) or ``NAME=key=value[,key=value...]``."""
    name, sep, rest = text.partition("=")
    if not sep or not _ARM_NAME.match(name):
        raise AblationSpecError(f"--arm {text!r}: expected NAME= or NAME=key=value[,key=value...] "
                                "(NAME: letters, digits, _ . -)")
    overrides = tuple(o.strip() for o in _OVERRIDE_START.split(rest) if o.strip())
    for override in overrides:
        key = override.partition("=")[0]
        if key in RESERVED:
            raise AblationSpecError(f"--arm {name}: {key} is set by the ablation for every arm (see --seeds)")
    return Arm(name, overrides)


@dataclass(frozen=True)
class AblationSpec:
    """Everything an ablation depends on (saved as ``OUT/ablation_spec.json``)."""

    config: str
    arms: tuple[Arm, ...]
    seeds: int
    sets: tuple[str, ...]
    out: str
    overrides: tuple[str, ...] = ()  # for every arm
    ranks: int = 2
    metrics: str = "psnr_y,ssim_y"
    sampler: str | None = None
    steps: int | None = None
    eta: float = 0.0
    bench_seed: int = 0
    extra_bench_args: tuple[str, ...] = field(default_factory=tuple)

    def check(self) -> list[str]:
        """Refuse a spec that cannot run (every arm's config is loaded); return warnings about pairing."""
        if len(self.arms) < 2:
            raise AblationSpecError("give at least two --arm (the first is the baseline the others are compared to)")
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise AblationSpecError(f"arm names must differ, got {', '.join(names)}")
        if self.seeds < 1 or self.ranks < 1:
            raise AblationSpecError(f"--seeds and --ranks must be >= 1 (got {self.seeds}, {self.ranks})")
        if not self.sets:
            raise AblationSpecError("give at least one --sets NAME=PATH to score the arms on")
        for arm in self.arms:
            for seed in self.seed_values():
                self.config_of(arm, seed)  # ConfigError names the key
        return [f"arm {arm.name} sets {o.partition('=')[0]}: its batches differ from the other arms', so its "
                "differences are not paired by data" for arm in self.arms for o in arm.overrides
                if o.startswith(DATA_KEYS)]

    def seed_values(self) -> list[int]:
        """``train.seed`` of the config, then the next ``seeds - 1`` integers."""
        base = load_config(self.config, list(self.overrides)).train.seed
        return [base + k for k in range(self.seeds)]

    def train_overrides(self, arm: Arm, seed: int) -> list[str]:
        return [*self.overrides, *arm.overrides, f"train.seed={seed}"]

    def config_of(self, arm: Arm, seed: int) -> Config:
        return load_config(self.config, [*self.train_overrides(arm, seed), f"train.run_dir={self.run_dir(arm, seed)}"])

    def run_dir(self, arm: Arm, seed: int) -> Path:
        return Path(self.out) / "runs" / arm.name / f"seed{seed}"

    def bench_dir(self, arm: Arm, seed: int) -> Path:
        return Path(self.out) / "bench" / arm.name / f"seed{seed}"

    def bench_args(self, arm: Arm, seed: int) -> list[str]:
        """launcher/benchmark.py arguments for one run: every checkpoint, the same sets and sampler noise."""
        args = ["--run", str(self.run_dir(arm, seed)), "--ckpts", "all", "--sets", *self.sets,
                "--metrics", self.metrics, "--out", str(self.bench_dir(arm, seed)), "--seed", str(self.bench_seed),
                "--eta", str(self.eta), *self.extra_bench_args]
        args += ["--sampler", self.sampler] if self.sampler else []
        args += ["--steps", str(self.steps)] if self.steps else []
        return args

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["arms"] = {arm.name: list(arm.overrides) for arm in self.arms}
        return out
