"""Submitting to Slurm with submitit: training, the make_shards job array, the benchmark sweep.

    python launcher/submit.py --config configs/samdiffsr_df2k4x.yaml --nodes 2 --gpus-per-node 8 --time 1440
    python launcher/submit.py shards --parts 16 --gpus-per-node 1 -- --images DF2K --out shards/df2k \\
        --sam-checkpoint sam_vit_h.pth
    python launcher/submit.py benchmark --gpus-per-node 4 -- --run runs/x --sets Set5=shards/set5
    srun python launcher/submit.py rank --config ...      (one training rank inside an allocation)

Training runs one task per GPU (``--tasks-per-node`` on CPU-only clusters), each task one DeepSpeed rank,
initialised from the job (see :mod:`samdiffsr.cluster.jobs`, which also explains the preemption design).
Everything a job writes goes under one run folder, printed at submit time with the job id, the log files
and how to follow them: training ``train.run_dir`` (checkpoints/, weights/, tb/, losses.jsonl,
summary.json, and slurm/ with submitit's logs and pickles), shards the ``--out`` folder, the benchmark
its ``--out`` (default ``<run>/benchmark``). Each submission is appended to ``<folder>/submissions.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import submitit

from samdiffsr.cli import ArgumentParser, UserError
from samdiffsr.cluster.jobs import BenchmarkJob, ShardsMerge, ShardsPart, TrainJob
from samdiffsr.config import Config, ConfigError
from samdiffsr.data.shardlist import expand_shards

DESCRIPTION = """\
Submit SAM-DiffSR jobs to Slurm (through submitit; no ssh or pdsh needed). Commands:
  [train] --config C [key=value ...] [options]     training, one task (DeepSpeed rank) per GPU
  shards --parts P [options] -- MAKE_SHARDS_ARGS   make_shards as a P-task array, then a dependent merge job
  benchmark [options] -- BENCHMARK_ARGS            launcher/benchmark.py, the tasks share the images
  ablate ABLATE_ARGS [options]                     launcher/ablate.py: a training job per arm x seed, then
                                                   one evaluation job that depends on them
  rank --config C [key=value ...]                  one training rank inside an allocation (under srun)
"""
EPILOG = """\
A training job is preemption-safe: on SIGUSR2 (sent --signal-delay seconds before the time limit, or by
`scancel --signal=USR2 JOBID`) all ranks save a checkpoint at the next step and the job requeues itself with
the same id and run folder, resuming from <run_dir>/checkpoints/latest. Submitting the same command again
after a job ended also resumes (train.resume=auto).
"""


@dataclass
class SlurmOptions:
    """Resources of a submission; each maps to one sbatch option (see :meth:`executor_parameters`)."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: int = 24 * 60
    mem: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    job_name: str | None = None
    folder: str | None = None
    signal_delay: int = 120
    max_requeues: int = 3
    setup: list[str] = field(default_factory=list)

    @property
    def tasks(self) -> int:
        """Tasks per node: one per GPU unless given."""
        return self.tasks_per_node or self.gpus_per_node or 1

    def executor_parameters(self, job_name: str) -> dict[str, Any]:
        """submitit.SlurmExecutor parameters (its names; the sbatch option in the comment)."""
        params: dict[str, Any] = {
            "job_name": self.job_name or job_name,  # --job-name
            "nodes": self.nodes,  # --nodes
            "ntasks_per_node": self.tasks,  # --ntasks-per-node
            "time": self.time,  # --time (minutes)
            "signal_delay_s": self.signal_delay,  # --signal=USR2@S
            "additional_parameters": {"requeue": True},  # --requeue (Slurm may requeue on preemption)
        }
        optional = {"gpus_per_node": self.gpus_per_node or None, "cpus_per_task": self.cpus_per_task,
                    "partition": self.partition, "account": self.account, "qos": self.qos, "mem": self.mem,
                    "constraint": self.constraint, "exclusive": self.exclusive or None,
                    "setup": self.setup or None}
        params.update({k: v for k, v in optional.items() if v is not None})
        return params


def add_slurm_arguments(parser: argparse.ArgumentParser, multi_task: bool = True) -> None:
    g = parser.add_argument_group("Slurm resources (each maps to the sbatch option in brackets)")
    if multi_task:
        g.add_argument("--nodes", type=int, default=1, help="nodes [--nodes] (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per node [--gpus-per-node]; training runs one task (rank) per GPU (default 0)")
    if multi_task:
        g.add_argument("--tasks-per-node", type=int, default=None,
                       help="tasks per node [--ntasks-per-node] (default: --gpus-per-node, at least 1); "
                       "CPU-only clusters set this")
    g.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per task [--cpus-per-task]; also torch's thread count unless OMP_NUM_THREADS is set")
    g.add_argument("--partition", help="partition [--partition]")
    g.add_argument("--account", help="account to charge [--account]")
    g.add_argument("--qos", help="quality of service [--qos]")
    g.add_argument("--time", type=int, default=24 * 60, help="time limit in minutes [--time] (default 1440)")
    g.add_argument("--mem", help="memory per node, e.g. 200G [--mem]")
    g.add_argument("--constraint", help="node features, e.g. a100 [--constraint]")
    g.add_argument("--exclusive", action="store_true", help="whole nodes [--exclusive]")
    g.add_argument("--job-name", help="job name [--job-name] (default samdiffsr-<command>)")
    g.add_argument("--folder", help="submitit folder for logs and pickles (default <run folder>/slurm)")
    g.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which SIGUSR2 asks for a checkpoint [--signal=USR2@S] "
                   "(default 120)")
    g.add_argument("--max-requeues", type=int, default=3,
                   help="requeues after hitting the time limit (submitit's max_num_timeout; preemptions do "
                   "not count) (default 3)")
    g.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run in the job before the tasks start, e.g. 'module load cuda' "
                   "(repeatable)")


def options_from_args(args: argparse.Namespace) -> SlurmOptions:
    names = {f for f in SlurmOptions.__dataclass_fields__}
    return SlurmOptions(**{k: v for k, v in vars(args).items() if k in names})


class NoSlurmError(UserError):
    """There is no Slurm to submit to (no ``sbatch``), or it refused the submission."""


def require_slurm() -> None:
    """A one-line :class:`NoSlurmError` when ``sbatch`` is not on PATH (checked before anything is queued)."""
    if shutil.which("sbatch") is None:
        raise NoSlurmError("no Slurm found: sbatch is not on PATH (submit.py queues Slurm jobs; without Slurm, "
                           "run the command directly: launcher/train.py, make_shards.py, benchmark.py, ablate.py)")


def make_executor(opts: SlurmOptions, folder: Path, job_name: str, **extra: Any) -> submitit.SlurmExecutor:
    require_slurm()
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=opts.max_requeues)
    executor.update_parameters(**{**opts.executor_parameters(job_name), **extra})
    return executor


def record(folder: Path, kind: str, job_ids: list[str], argv: list[str], opts: SlurmOptions) -> None:
    """Append the submission to ``<folder>/submissions.jsonl`` (what ran when, with which options)."""
    folder.mkdir(parents=True, exist_ok=True)
    line = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "kind": kind, "job_ids": job_ids, "argv": argv,
            "cwd": os.getcwd(), "options": asdict(opts)}
    with (folder / "submissions.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")


def follow_lines(job: submitit.SlurmJob, what: str) -> list[str]:
    out, err = job.paths.stdout, job.paths.stderr
    return [f"  logs        {out}  ({what}; stderr: {err.name})",
            f"  follow      tail -f {out} {err}",
            f"              squeue -j {job.job_id}      scancel {job.job_id}"]


def check_training_inputs(cfg: Config) -> None:
    """The files a training job needs at start, checked at submit time: its shards and RRDB weights."""
    from samdiffsr.train.build import check_rrdb_weights

    settings = cfg.train
    resuming = (settings.resume not in ("auto", "never", "must")
                or (Path(settings.run_dir) / "checkpoints" / "latest").exists())
    if settings.task == "diffusion" and not resuming:  # a fresh start loads the RRDB (train/build.py)
        check_rrdb_weights(settings)
        if settings.rrdb_ckpt and not Path(settings.rrdb_ckpt).is_file():
            raise ConfigError(f"config key 'train.rrdb_ckpt': file not found: {settings.rrdb_ckpt}")
    try:
        expand_shards(cfg.data.train_shards)
    except FileNotFoundError as exc:
        raise ConfigError(f"config key 'data.train_shards': {exc}") from exc


# --- the commands ------------------------------------------------------------------------------------
def submit_train(argv: list[str]) -> int:
    from samdiffsr.config import load_config
    from samdiffsr.train.build import deepspeed_config

    parser = ArgumentParser(prog="submit", description=DESCRIPTION, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", help="training config (configs/*.yaml)")
    parser.add_argument("--run-dir", help="run folder (overrides train.run_dir)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=1000")
    add_slurm_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    opts = options_from_args(args)
    overrides = list(args.overrides) + ([f"train.run_dir={args.run_dir}"] if args.run_dir else [])
    world = opts.nodes * opts.tasks
    # Refuse before queueing what would fail at start (ConfigError: one line, exit 2, samdiffsr.cli).
    cfg = load_config(args.config, overrides)
    deepspeed_config(cfg, world)
    check_training_inputs(cfg)
    run_dir = Path(cfg.train.run_dir).resolve()
    folder = Path(opts.folder).resolve() if opts.folder else run_dir / "slurm"
    config = str(Path(args.config).resolve()) if args.config else None
    job = make_executor(opts, folder, "samdiffsr-train").submit(TrainJob(config, overrides, str(run_dir)))
    record(folder, "train", [job.job_id], argv, opts)
    print(f"Submitted training job {job.job_id}: {opts.nodes} node(s) x {opts.tasks} task(s) = {world} rank(s)")
    print(f"  run folder  {run_dir}  (checkpoints/ weights/ tb/ losses.jsonl summary.json)")
    print(*follow_lines(job, "rank 0; rank r: <job>_<r>_log.out"), sep="\n")
    print(f"              tensorboard --logdir {run_dir / 'tb'}")
    print(f"  checkpoint  scancel --signal=USR2 {job.job_id}   (all ranks save, the job requeues and resumes)")
    print(f"  resume      automatic on preemption / time limit; after the job ended, the same command "
          f"continues from {run_dir / 'checkpoints' / 'latest'}")
    return 0


def _split_dashes(argv: list[str], command: str) -> tuple[list[str], list[str]]:
    if "--" not in argv:
        if "-h" in argv or "--help" in argv:
            return argv, []  # the command's parser prints its help
        raise UserError(f"put the {command} arguments after '--' (submit.py {command} [options] -- ARGS)")
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def submit_shards(argv: list[str]) -> int:
    from samdiffsr.sharding.cli import settings_from_args

    ours, rest = _split_dashes(argv, "shards")
    parser = ArgumentParser(prog="submit shards", allow_abbrev=False,
                            usage="%(prog)s --parts P [options] -- MAKE_SHARDS_ARGS",
                            description="make_shards (launcher/make_shards.py) as a Slurm job array: task i "
                            "writes part i of P, a dependent job merges the manifests.",
                            epilog="Everything after '--' is passed to make_shards (see launcher/make_shards.py "
                            "--help), with --num-parts P --part i added.")
    parser.add_argument("--parts", type=int, required=True, help="array tasks = parts of the image list")
    add_slurm_arguments(parser, multi_task=False)
    args = parser.parse_args(ours)
    if args.parts < 1:
        parser.error("--parts must be >= 1")
    try:  # make_shards' own checks (it prints its usage error)
        shard_args, _ = settings_from_args([*rest, "--num-parts", str(args.parts), "--part", "0"])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    opts = options_from_args(args)
    out = Path(shard_args.out).resolve()
    folder = Path(opts.folder).resolve() if opts.folder else out / "slurm"
    parts = make_executor(opts, folder, "samdiffsr-shards").map_array(ShardsPart(rest, args.parts),
                                                                      range(args.parts))
    array_id = parts[0].job_id.split("_")[0]
    merge_opts = SlurmOptions(**{**asdict(opts), "gpus_per_node": 0, "cpus_per_task": 1, "time": 60})
    merge = make_executor(merge_opts, folder, "samdiffsr-shards-merge", dependency=f"afterok:{array_id}",
                          additional_parameters={"requeue": True, "kill-on-invalid-dep": "yes"}
                          ).submit(ShardsMerge(str(out)))
    record(folder, "shards", [array_id, merge.job_id], argv, opts)
    print(f"Submitted make_shards array {array_id} ({args.parts} parts) and merge job {merge.job_id} "
          f"(after the array succeeds)")
    print(f"  run folder  {out}  (shards, parts/, then sizes.json manifest.json report.json)")
    print(f"  logs        {folder}/{array_id}_<part>_0_log.out  (merge: {merge.paths.stdout.name})")
    print(f"  follow      tail -f {parts[0].paths.stdout}")
    print(f"              squeue -j {array_id},{merge.job_id}      scancel {array_id} {merge.job_id}")
    print("  resume      a part that is preempted requeues and continues from its journal; rerunning the same "
          "command redoes only unfinished parts")
    return 0


def submit_benchmark(argv: list[str]) -> int:
    from samdiffsr.evaluation.benchmark_cli import build_parser

    ours, rest = _split_dashes(argv, "benchmark")
    parser = ArgumentParser(prog="submit benchmark", allow_abbrev=False,
                            usage="%(prog)s [options] -- BENCHMARK_ARGS",
                            description="launcher/benchmark.py as a Slurm job; its tasks share the images "
                            "(SLURM_PROCID / SLURM_NTASKS), rank 0 writes the tables.",
                            epilog="Everything after '--' is passed to the benchmark (see launcher/benchmark.py "
                            "--help).")
    add_slurm_arguments(parser)
    args = parser.parse_args(ours)
    bench = build_parser().parse_args(rest)
    if not (bench.out or bench.run):
        raise UserError("give the benchmark --out, or --run (then <run>/benchmark)")
    opts = options_from_args(args)
    out = Path(bench.out or Path(bench.run) / "benchmark").resolve()
    folder = Path(opts.folder).resolve() if opts.folder else out / "slurm"
    job = make_executor(opts, folder, "samdiffsr-benchmark").submit(BenchmarkJob(rest))
    record(folder, "benchmark", [job.job_id], argv, opts)
    print(f"Submitted benchmark job {job.job_id}: {opts.nodes} node(s) x {opts.tasks} task(s)")
    print(f"  run folder  {out}  (results.csv/.json/.md, plots)")
    print(*follow_lines(job, "task 0"), sep="\n")
    print("  resume      a preempted sweep requeues itself; finished (checkpoint, set) pairs are not redone")
    return 0
