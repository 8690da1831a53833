"""Launching: the sbatch script's contents, and a real SLURM job (two nodes on this
machine) that is preempted with USR1, requeues itself, resumes from its checkpoint and
ends with the same loss as an uninterrupted run."""

import json
import re
import subprocess
import sys
import time

import pytest

from mamba_train.cli import main
from mamba_train.train.loop import train
from slurm_cluster import started_cluster
from synthetic import tiny_config, tiny_overrides


def test_sbatch_dry_run_has_rendezvous_signal_requeue_and_resume(repo_root, tmp_path, capsys):
    overrides = [f"logging.run_dir={tmp_path}"]
    assert main(["launch", "slurm", "--nodes", "2", "--gpus-per-node", "4", "--time", "01:00:00", "--dry-run",
                 "--sbatch=--partition=gpu", str(repo_root / "configs/130m.yaml"), *overrides]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --partition=gpu",
                 "#SBATCH --time=01:00:00", f"#SBATCH --output={tmp_path}/slurm/%x-%j.out"):
        assert line in script
    assert "--nproc-per-node 4" in script and "--rdzv-backend c10d" in script
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert re.search(r"train \S+/configs/130m\.yaml logging\.run_dir=\S+ --resume auto", script)
    assert "NCCL_NVLS_ENABLE=0" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert not list(tmp_path.iterdir()), "a dry run writes nothing"


def test_launch_rejects_a_bad_config_before_submitting(repo_root, capsys):
    assert main(["launch", "slurm", "--dry-run", str(repo_root / "configs/130m.yaml"), "model.n_layers=3"]) == 2
    assert "unknown key model.n_layers" in capsys.readouterr().err


def test_torchrun_dry_run_resumes_automatically(repo_root, capsys):
    assert main(["launch", "torchrun", "--nproc-per-node", "2", "--dry-run", str(repo_root / "configs/tiny-cpu.yaml"),
                 "train.steps=5"]) == 0
    command = capsys.readouterr().out
    assert "-m torch.distributed.run --standalone --nproc-per-node 2 -m mamba_train.cli train" in command
    assert command.strip().endswith("train.steps=5 --resume auto")



@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    yield from started_cluster(tmp_path_factory)


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_slurm_job_requeues_and_finishes_like_an_uninterrupted_run(slurm, markov_data, tmp_path, repo_root):
    steps = ["train.steps=400", "logging.log_every=1", "checkpoint.every=0", "train.torch_threads=1"]
    reference = train(tiny_config(markov_data, tmp_path / "reference", *steps))

    run_dir = tmp_path / "job"
    overrides = tiny_overrides(markov_data, run_dir, *steps)
    submitted = subprocess.run(
        [sys.executable, "-m", "mamba_train.cli", "launch", "slurm", "--nodes", "1", "--gpus-per-node", "0",
         "--cpus-per-task", "1", "--time", "10:00", str(repo_root / "configs/tiny-cpu.yaml"), *overrides],
        cwd=repo_root, env=slurm.env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    log = run_dir / "slurm" / f"tiny-cpu-{job_id}.out"

    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 20):
        time.sleep(0.2)
    assert metrics.exists(), f"the job never started training; log:\n{log.read_text() if log.exists() else ''}"
    slurm.run("scancel", "--signal=USR1", "--batch", job_id)

    # The job checkpoints, exits 0 and requeues itself; only a terminal state of the second
    # run counts (the first run's end passes through some).
    state = slurm.finish_requeued_job(job_id, restarted=lambda: log.exists() and "(restart 1)" in log.read_text(),
                                      timeout=300)
    text = log.read_text()
    assert state == "COMPLETED", text
    assert "USR1: checkpoint saved at step" in text and "requeueing job" in text
    assert "(restart 1)" in text and "resumed from" in text

    losses = {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        losses[row["step"]] = row["loss"]  # a step redone after the resume would overwrite: none is
    assert losses == reference.losses
