"""``submit.py ablate``: an ablation on Slurm, one training job per arm x seed and one evaluation job that
runs when all of them succeeded (scores every run, then compares the arms). Arguments as ``launcher/ablate.py``
(``--ranks`` is ignored: the Slurm resources decide the ranks), plus the Slurm options of training."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import submitit

from samdiffsr.ablation.cli import add_ablation_arguments, spec_from_args
from samdiffsr.ablation.plan import AblationSpec
from samdiffsr.cli import ArgumentParser
from samdiffsr.cluster.jobs import TrainJob, limit_threads
from samdiffsr.cluster.slurm import SlurmOptions, add_slurm_arguments, make_executor, options_from_args, record


@dataclass
class AblationEvaluate:
    """Score every arm x seed run and compare (``samdiffsr.ablation.run``); resumable like the benchmark."""

    spec: AblationSpec
    done: list[str] = field(default_factory=list)

    def __call__(self) -> list[str]:
        import os

        from samdiffsr.ablation.run import analyse, score_arms

        limit_threads(os.environ)
        score_arms(self.spec)
        return analyse(self.spec)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self)  # finished (checkpoint, set) pairs are not redone


def submit_ablate(argv: list[str]) -> int:
    from samdiffsr.ablation.run import pin_spec
    from samdiffsr.cluster.slurm import check_training_inputs

    parser = ArgumentParser(prog="submit ablate", allow_abbrev=False, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_ablation_arguments(parser)
    add_slurm_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    opts = options_from_args(args)
    spec = spec_from_args(args)
    spec = AblationSpec(**{**asdict(spec), "arms": spec.arms, "config": str(Path(spec.config).resolve()),
                           "out": str(Path(spec.out).resolve()), "ranks": opts.nodes * opts.tasks})
    for warning in spec.check():
        print(f"warning: {warning}")
    runs = [(arm, seed) for arm in spec.arms for seed in spec.seed_values()]
    for arm, seed in runs:  # refuse before queueing anything
        check_training_inputs(spec.config_of(arm, seed))
    pin_spec(spec)
    folder = Path(opts.folder).resolve() if opts.folder else Path(spec.out) / "slurm"
    executor = make_executor(opts, folder, "samdiffsr-ablate-train")
    train_jobs = [executor.submit(TrainJob(spec.config, spec.train_overrides(arm, seed),
                                           str(spec.run_dir(arm, seed).resolve()))) for arm, seed in runs]
    ids = [job.job_id for job in train_jobs]
    eval_opts = SlurmOptions(**{**asdict(opts), "nodes": 1, "tasks_per_node": 1})
    evaluate = make_executor(eval_opts, folder, "samdiffsr-ablate-eval", dependency="afterok:" + ":".join(ids),
                             additional_parameters={"kill-on-invalid-dep": "yes"}).submit(AblationEvaluate(spec))
    record(folder, "ablate", [*ids, evaluate.job_id], argv, opts)
    print(f"Submitted {len(ids)} training jobs ({len(spec.arms)} arms x {spec.seeds} seeds) and evaluation job "
          f"{evaluate.job_id} (after all of them succeed)")
    for (arm, seed), job in zip(runs, train_jobs, strict=True):
        print(f"  {job.job_id:>10}  arm {arm.name}, seed {seed}: {spec.run_dir(arm, seed)}")
    print(f"  results     {Path(spec.out) / 'ablation.md'}  (when job {evaluate.job_id} ends)")
    print(f"  logs        {folder}")
    print(f"              squeue -j {','.join([*ids, evaluate.job_id])}")
    print("  resume      a preempted job requeues and continues; submitting the same command again resumes too")
    return 0
