"""Resume a run folder's checkpoint as `train` does, stop at the resume point and dump what was restored.

    torchrun --nproc_per_node 2 tests/elastic_probe.py OUT.pt --config ... train.resume=... [-- OUT2.pt ...]

Several probes may follow each other, separated by ``--`` (one process group, one DeepSpeed import). Rank 0
writes OUT.pt: Adam's step and moments per parameter name (deepspeed.utils.safe_get_full_optimizer_state
under ZeRO 1/2, which every rank calls; the torch Adam state under ZeRO 0), the weights, the EMA, the loss
scale, the lr of the next update, the data position and the per-rank generator's next draw.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist

from samdiffsr.config import load_config
from samdiffsr.train import checkpoints
from samdiffsr.train.build import build_ema, build_trainer
from samdiffsr.train.collective import exit_process, gather, init_distributed
from samdiffsr.train.optimizer_state import full_state
from samdiffsr.train.resume import resume, resume_points, trainable
from samdiffsr.train.schedule import lr_at


def probe(argv: list[str]) -> dict[str, Any]:
    """The restored state of the resume ``argv`` (a train command line) asks for (rank 0's; None elsewhere)."""
    cfg = load_config(argv[argv.index("--config") + 1], [a for a in argv if "=" in a and not a.startswith("-")])
    rank, world_size, device = init_distributed()
    points = resume_points(cfg.train.resume, checkpoints.Checkpoints(cfg.train.run_dir, 1, 0, rank).dir, rank)
    trainer = build_trainer(cfg, rank, world_size, device, load_rrdb=False)
    run, saved_ema = resume(trainer, points)
    ema = build_ema(trainer.net, cfg.train.ema_decay, saved_ema)
    named = trainable(trainer)
    state = full_state(trainer.engine, named)  # a collective under ZeRO 1/2
    draws = gather(torch.rand(2, generator=trainer.generator).tolist())
    return {"step": run.step, "position": list(run.position), "adam_step": state["step"],
            "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"],
            "weights": {n: p.detach().float().cpu().clone() for n, p in named},
            "ema": ema.state_dict() if ema else None, "loss_scale": trainer.update.loss_scale(),
            "lr": lr_at(cfg.optim, run.step), "world_size": world_size,
            "zero_stage": trainer.engine.zero_optimization_stage(), "draws": draws}


def main(args: list[str]) -> None:
    while args:
        cut = args.index("--") if "--" in args else len(args)
        out, argv, args = args[0], args[1:cut], args[cut + 1:]
        result = probe(argv)
        if dist.get_rank() == 0:
            torch.save(result, out)


if __name__ == "__main__":
    main(sys.argv[1:])
    exit_process(0)  # as a training process ends (samdiffsr.train.engine.process_main): no teardown abort
