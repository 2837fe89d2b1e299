"""Slurm jobs on a real local cluster: launcher/submit.py (submitit) and the slurm/*.sbatch scripts.

- a 2-rank CPU DeepSpeed training submitted with launcher/submit.py runs to the end (the reference run);
- the same run preempted with SIGUSR2 saves, is requeued, resumes and ends with the reference's weights;
- slurm/train.sbatch (srun, ranks from SLURM_* variables) does the same, requeueing itself;
- a 3-task make_shards array (sbatch script, and submit.py shards) writes the samples of a 1-process run;
- a 2-task benchmark sweep (submit.py benchmark, and slurm/benchmark.sbatch) scores like a 1-process sweep.

Uses the `slurm_cluster` fixture (tests/slurm_cluster.py); skipped without Slurm unless SAMDIFFSR_REQUIRE_SLURM=1.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import submitit
import torch
from PIL import Image
from slurm_cluster import SlurmCluster, SlurmTimeout, logs
from train_helpers import TINY, write_shards

from samdiffsr.cluster.jobs import TrainJob, slurm_distributed_env
from samdiffsr.cluster.slurm import SlurmOptions
from samdiffsr.cluster.submit import main as submit_main
from samdiffsr.data.reader import read_samples
from samdiffsr.evaluation.benchmark_cli import main as benchmark
from samdiffsr.sharding.cli import main as make_shards

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 60
STOP_AFTER = 10  # steps logged before the preemption signal is sent
JOB_TIMEOUT = 300
SHARD_ARGS = ["--scale", "4", "--tile", "64", "--step", "64", "--thresh", "32", "--max-count", "5",
              "--masker", "felzenszwalb"]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry", "hubble_deep_field")


def train_args(shards: str, run_dir: Path) -> list[str]:
    return [*TINY, "train.freeze_rrdb=false", f"train.max_steps={STEPS}", f"data.train_shards={shards}",
            f"train.run_dir={run_dir}"]


def job_env(cluster: SlurmCluster) -> dict[str, str]:
    """The cluster's environment plus CPU DeepSpeed, one thread per rank (jobs inherit it through sbatch)."""
    return {**cluster.env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def submit(cluster: SlurmCluster, args: list[str]) -> tuple[str, str]:
    """launcher/submit.py ARGS as a user runs it; returns (job id, what it printed)."""
    done = subprocess.run([sys.executable, str(REPO / "launcher" / "submit.py"), *args], cwd=REPO,
                          env=job_env(cluster), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"submit.py failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    match = re.search(r"^Submitted \S+ (?:job|array) (\d+)", done.stdout, re.M)
    assert match, done.stdout
    return match.group(1), done.stdout


def wait_completed(cluster: SlurmCluster, job_id: str, log_folder: Path, timeout: float = JOB_TIMEOUT) -> None:
    state = cluster.wait(job_id, timeout=timeout)
    assert state == "COMPLETED", f"job {job_id} ended {state}\n{logs(log_folder)}\n{cluster.diagnostics()}"


def wait_for_steps(cluster: SlurmCluster, job_id: str, run_dir: Path, steps: int, timeout: float = 180) -> None:
    """Until rank 0 has logged `steps` training steps (losses.jsonl), i.e. the training loop is running."""
    losses = run_dir / "losses.jsonl"
    end = time.monotonic() + timeout
    while not (losses.is_file() and len(losses.read_text().splitlines()) >= steps):
        state = cluster.state(job_id)
        if state not in ("PENDING", "RUNNING", "CONFIGURING") or time.monotonic() > end:
            cluster.run(["scancel", job_id], check=False)
            raise SlurmTimeout(f"job {job_id} is {state} before step {steps}\n{logs(run_dir, '**/*.out')}")
        time.sleep(0.2)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "weights" / "latest.pt", map_location="cpu", weights_only=True)


def losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


def assert_same_training(run_dir: Path, reference: Path) -> None:
    ours, ref = weights(run_dir), weights(reference)
    assert ours["step"] == ref["step"] == STEPS
    assert ours["model"].keys() == ref["model"].keys()
    different = [k for k in ref["model"] if not torch.equal(ours["model"][k], ref["model"][k])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"
    assert losses(run_dir) == losses(reference)


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = write_shards(tmp_path_factory.mktemp("train_shards"))
    return f"{folder}/train-{{000000..000001}}.tar"


@pytest.fixture(scope="module")
def reference_run(slurm_cluster: SlurmCluster, train_shards: str, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted 2-rank run submitted with launcher/submit.py: (run dir, job id, what submit printed)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    job_id, printed = submit(slurm_cluster, [*train_args(train_shards, run_dir), "--tasks-per-node", "2",
                                             "--cpus-per-task", "1", "--time", "60", "--job-name", "ref-train"])
    wait_completed(slurm_cluster, job_id, run_dir / "slurm")
    return run_dir, job_id, printed


def test_submit_trains_on_two_ranks(slurm_cluster: SlurmCluster, reference_run) -> None:
    run_dir, job_id, printed = reference_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["world_size"] == 2 and not summary["stopped"]
    assert len(set(summary["weights_sha256_per_rank"])) == 1
    # submitit's view: both tasks returned the engine's summary
    job = submitit.SlurmJob(folder=run_dir / "slurm", job_id=job_id, tasks=(0, 1))
    assert [r["step"] for r in job.results()] == [STEPS, STEPS]
    # what submit printed: the run folder, the logs and how to follow them
    log = run_dir / "slurm" / f"{job_id}_0_log.out"
    assert f"run folder  {run_dir}" in printed and f"tail -f {log}" in printed and f"squeue -j {job_id}" in printed
    assert "2 rank(s)" in log.read_text() or "2 rank(s)" in (run_dir / "slurm" / f"{job_id}_0_log.err").read_text()
    assert json.loads((run_dir / "slurm" / "submissions.jsonl").read_text())["job_ids"] == [job_id]
    # the options reached Slurm
    shown = slurm_cluster.run(["scontrol", "show", "job", job_id]).stdout
    for field in ("JobName=ref-train", "NumTasks=2", "CPUs/Task=1", "TimeLimit=01:00:00", "Requeue=1"):
        assert field in shown, shown


def test_preempted_job_resumes_to_the_same_weights(slurm_cluster: SlurmCluster, reference_run, train_shards: str,
                                                   tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job_id, _ = submit(slurm_cluster, [*train_args(train_shards, run_dir), "--tasks-per-node", "2",
                                       "--cpus-per-task", "1", "--time", "60"])
    wait_for_steps(slurm_cluster, job_id, run_dir, STOP_AFTER)
    slurm_cluster.run(["scancel", "--signal=USR2", job_id])  # what Slurm sends before a time limit
    wait_completed(slurm_cluster, job_id, run_dir / "slurm")

    summary = json.loads((run_dir / "summary.json").read_text())
    resumed = re.fullmatch(r".*/checkpoints/step(\d+)", summary["resumed_from"] or "")
    assert resumed, summary
    assert STOP_AFTER <= int(resumed.group(1)) < STEPS  # the checkpoint written at the signal
    rank0 = (run_dir / "slurm" / f"{job_id}_0_log.out").read_text()
    assert "this job is preempted" in rank0 and f"Requeued job {job_id}" in rank0, rank0
    assert rank0.count("Starting with JobEnvironment") == 2, rank0
    assert_same_training(run_dir, reference_run[0])


def test_sbatch_script_trains_and_requeues_itself(slurm_cluster: SlurmCluster, reference_run, train_shards: str,
                                                  tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job_id = slurm_cluster.sbatch(["-n", "2", "-c", "1", "--time", "10", "-o", f"{run_dir}/slurm-%j.out",
                                   str(REPO / "slurm" / "train.sbatch"), *train_args(train_shards, run_dir)],
                                  cwd=REPO, timeout=30)
    wait_for_steps(slurm_cluster, job_id, run_dir, STOP_AFTER)
    slurm_cluster.run(["scancel", "--signal=USR2", job_id])
    wait_completed(slurm_cluster, job_id, run_dir)

    out = (run_dir / f"slurm-{job_id}.out").read_text()
    assert "2 rank(s) on 1 node(s)" in out and f"requeueing job {job_id}" in out and "(restart 1)" in out, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["resumed_from"], summary
    assert_same_training(run_dir, reference_run[0])


# --- the make_shards array --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seven small real photos (fast to mask), in two folders."""
    root = tmp_path_factory.mktemp("photos")
    for i, name in enumerate(PHOTOS):
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        image.thumbnail((160, 160))
        path = root / ("sub" if i % 2 else "") / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        image.save(path)
    return root


@pytest.fixture(scope="module")
def single_process_samples(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("single") / "out"
    assert make_shards(["--images", str(photos), "--out", str(out), *SHARD_ARGS, "--workers", "1",
                        "--no-progress"]) == 0
    return samples_of(out)


def samples_of(out: Path) -> dict[str, dict]:
    """The decoded samples of a dataset by key (order-independent), from its merged manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples = {s["key"]: s for s in read_samples([str(out / s["name"]) for s in manifest["shards"]])}
    assert len(samples) == manifest["num_samples"]
    return samples


def assert_same_samples(ours: dict[str, dict], ref: dict[str, dict]) -> None:
    assert sorted(ours) == sorted(ref) and len(ref) > 10
    for key, sample in ref.items():
        for field in ("hr", "lr", "mask"):
            np.testing.assert_array_equal(ours[key][field], sample[field], err_msg=f"{key} {field}")
        assert ours[key]["meta"] == sample["meta"], key


def test_masks_array_sbatch_matches_single_process(slurm_cluster: SlurmCluster, photos: Path,
                                                   single_process_samples: dict, tmp_path: Path) -> None:
    out, script = tmp_path / "out", str(REPO / "slurm" / "masks_array.sbatch")
    array = slurm_cluster.sbatch(["--array=0-2", "-c", "1", "--time", "10", "-o", f"{tmp_path}/slurm-%A_%a.out",
                                  script, "--images", str(photos), "--out", str(out), *SHARD_ARGS,
                                  "--workers", "1"], cwd=REPO)
    merge = slurm_cluster.sbatch([f"--dependency=afterok:{array}", "--kill-on-invalid-dep=yes", "-c", "1",
                                  "--time", "10", "-o", f"{tmp_path}/slurm-%j.out", script, "--merge",
                                  "--out", str(out)], cwd=REPO)
    wait_completed(slurm_cluster, array, tmp_path)
    wait_completed(slurm_cluster, merge, tmp_path)

    assert len(slurm_cluster.states(array)) == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["parts"]) == 3 and all("-p" in s["name"] for s in manifest["shards"])
    assert "merged 3 parts" in (tmp_path / f"slurm-{merge}.out").read_text()
    assert_same_samples(samples_of(out), single_process_samples)


def test_submit_shards_array_and_merge(slurm_cluster: SlurmCluster, photos: Path, single_process_samples: dict,
                                       tmp_path: Path) -> None:
    out = tmp_path / "out"
    array, printed = submit(slurm_cluster, ["shards", "--parts", "3", "--cpus-per-task", "1", "--time", "10", "--",
                                            "--images", str(photos), "--out", str(out), *SHARD_ARGS,
                                            "--workers", "1"])
    merge = re.search(r"merge job (\d+)", printed).group(1)
    assert f"run folder  {out}" in printed
    wait_completed(slurm_cluster, array, out / "slurm")
    wait_completed(slurm_cluster, merge, out / "slurm")
    parts = [submitit.SlurmJob(folder=out / "slurm", job_id=f"{array}_{i}") for i in range(3)]
    assert [job.result() for job in parts] == [0, 0, 0]
    assert submitit.SlurmJob(folder=out / "slurm", job_id=merge).result() == 0
    assert_same_samples(samples_of(out), single_process_samples)


# --- the benchmark sweep ---------------------------------------------------------------------------------
def per_image(out: Path) -> dict[tuple, dict]:
    data = json.loads((out / "results.json").read_text())
    return {(r["checkpoint"], r["set"], r["key"]): r["metrics"] for r in data["per_image"]}


def test_benchmark_jobs_share_the_images(slurm_cluster: SlurmCluster, reference_run, tmp_path: Path) -> None:
    hr_set = tmp_path / "hr"
    hr_set.mkdir()
    for name, size in zip(PHOTOS[:3], [(44, 52), (64, 48), (40, 40)], strict=True):
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size).save(hr_set / f"{name}.png")
    args = ["--run", str(reference_run[0]), "--sets", f"Tiny={hr_set}", "--metrics", "psnr_y,ssim_y", "--seed", "1",
            "--quiet"]
    job_id, printed = submit(slurm_cluster, ["benchmark", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time",
                                             "10", "--", *args, "--out", str(tmp_path / "submitit")])
    assert f"run folder  {tmp_path / 'submitit'}" in printed
    sbatch_id = slurm_cluster.sbatch(["-n", "2", "-c", "1", "--time", "10", "-o", f"{tmp_path}/bench-%j.out",
                                      str(REPO / "slurm" / "benchmark.sbatch"), *args, "--out",
                                      str(tmp_path / "sbatch")], cwd=REPO)
    assert benchmark([*args, "--out", str(tmp_path / "single")]) == 0  # while the jobs run
    wait_completed(slurm_cluster, job_id, tmp_path / "submitit" / "slurm")
    wait_completed(slurm_cluster, sbatch_id, tmp_path)

    single = per_image(tmp_path / "single")
    assert len(single) == 6  # bicubic and step 60, three images
    for out in ("submitit", "sbatch"):
        shared = per_image(tmp_path / out)
        assert shared.keys() == single.keys()
        for key, metrics in single.items():
            assert shared[key] == pytest.approx(metrics, abs=1e-4), (out, key)
    assert "| step00000060 |" in (tmp_path / f"bench-{sbatch_id}.out").read_text()


# --- pieces without a cluster -------------------------------------------------------------------------------
def test_options_map_to_sbatch_parameters() -> None:
    opts = SlurmOptions(nodes=2, gpus_per_node=8, partition="gpu", account="proj", qos="high", time=90,
                        mem="200G", cpus_per_task=12, constraint="a100", exclusive=True, signal_delay=300)
    params = opts.executor_parameters("samdiffsr-train")
    assert params == {"job_name": "samdiffsr-train", "nodes": 2, "ntasks_per_node": 8, "gpus_per_node": 8,
                      "cpus_per_task": 12, "partition": "gpu", "account": "proj", "qos": "high", "time": 90,
                      "mem": "200G", "constraint": "a100", "exclusive": True, "signal_delay_s": 300,
                      "additional_parameters": {"requeue": True}}
    assert SlurmOptions(tasks_per_node=4).executor_parameters("x")["ntasks_per_node"] == 4
    assert "gpus_per_node" not in SlurmOptions().executor_parameters("x")


def test_distributed_env_and_checkpoint_resume_setting(tmp_path: Path) -> None:
    env = slurm_distributed_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                                 "SLURM_JOB_ID": "77", "MASTER_ADDR": "node01"})
    again = slurm_distributed_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "77",
                                   "MASTER_ADDR": "node01"})
    assert env["RANK"] == "3" and env["WORLD_SIZE"] == "8" and env["LOCAL_RANK"] == "1" and "MASTER_ADDR" not in env
    assert 20000 <= int(env["MASTER_PORT"]) <= 60000 and env["MASTER_PORT"] == again["MASTER_PORT"]
    with pytest.raises(RuntimeError, match="srun"):
        slurm_distributed_env({})

    job = TrainJob("c.yaml", ["train.resume=never", "train.max_steps=5"], str(tmp_path))
    assert job.checkpoint().function is job  # nothing saved yet: restart as submitted
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step00000003")
    requeued = job.checkpoint().function
    assert requeued.argv() == ["--config", "c.yaml", "train.max_steps=5", "train.resume=must",
                               f"train.run_dir={tmp_path}"]


def test_bad_submissions_are_refused_before_queueing(capsys: pytest.CaptureFixture) -> None:
    assert submit_main(["train.max_stepz=3", "--tasks-per-node", "2"]) == 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err
    assert submit_main(["train.batch_size=3", "--tasks-per-node", "2"]) == 2  # 3 images over 2 ranks
    assert "not divisible" in capsys.readouterr().err
    assert submit_main(["shards", "--parts", "2", "--images", "x"]) == 2
    assert "after '--'" in capsys.readouterr().err


# --- ablations -------------------------------------------------------------------------------------------
def test_submit_ablate_trains_every_arm_then_evaluates_them(slurm_cluster: SlurmCluster, train_shards: str,
                                                           tmp_path: Path) -> None:
    val, out = tmp_path / "val", tmp_path / "ablate"
    val.mkdir()
    for name in PHOTOS[:2]:
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((40, 40)).save(val / f"{name}.png")
    args = ["ablate", "--config", str(REPO / "configs" / "demo.yaml"), *TINY, "train.freeze_rrdb=false",
            "train.rrdb_ckpt=", "train.max_steps=4", "train.ckpt_every=2", f"data.train_shards={train_shards}",
            "--arm", "sam=", "--arm", "plain=model.sam_modulation=false", "--sets", f"v={val}", "--sampler", "ddim",
            "--steps", "2", "--out", str(out), "--cpus-per-task", "1", "--time", "10"]
    done = subprocess.run([sys.executable, str(REPO / "launcher" / "submit.py"), *args], cwd=REPO,
                          env=job_env(slurm_cluster), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    train_ids = re.findall(r"^\s+(\d+)  arm (\w+), seed 1234: ", done.stdout, re.M)
    assert [arm for _, arm in train_ids] == ["sam", "plain"]
    evaluate = re.search(r"and evaluation job (\d+) \(after all of them succeed\)", done.stdout).group(1)
    wait_completed(slurm_cluster, evaluate, out / "slurm", timeout=600)
    for job_id, arm in train_ids:
        assert slurm_cluster.state(job_id) == "COMPLETED"
        assert json.loads((out / "runs" / arm / "seed1234" / "summary.json").read_text())["step"] == 4
    verdicts = submitit.SlurmJob(folder=out / "slurm", job_id=evaluate).result()
    assert [v.split(":")[0] for v in verdicts] == ["plain vs sam, step 4, psnr_y", "plain vs sam, step 4, ssim_y"]
    rows = (out / "ablation.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 and (out / "ablation.md").is_file()
