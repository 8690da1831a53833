"""Launching: the sbatch script's contents, and a real SLURM job on two nodes of this
machine (tests/slurm_cluster.py), one trainer each, that is preempted with USR1, requeues
itself, resumes from its sharded checkpoint and ends exactly like an uninterrupted
2-process run."""

import json
import re
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from mamba_train.cli import main
from slurm_cluster import started_cluster
from synthetic import tiny_overrides


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


@pytest.mark.parametrize("launch, overrides, message", [
    (["torchrun", "--nproc-per-node", "2"], ["parallel.tp=3"],
     "world size 2 = 1 node(s) × 2 process(es) per node: parallel.tp=3 must divide model nheads=8"),
    (["torchrun", "--nproc-per-node", "3"], ["parallel.tp=2", "model.ngroups=2"],
     "world size 3 is not tp·cp·dp for tp=2"),
    (["slurm"], ["parallel.tp=3"], "world size 8 = 1 node(s) × 8 process(es) per node: parallel.tp=3 must divide"),
    (["slurm", "--nodes", "2", "--gpus-per-node", "0"], ["parallel.cp=3"], "parallel.cp=3 must divide data.seq_len"),
])
def test_launch_checks_the_layout_for_its_world_size_before_starting(repo_root, capsys, launch, overrides, message):
    assert main(["launch", *launch, "--dry-run", str(repo_root / "configs/tiny-cpu.yaml"), *overrides]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: parallel layout") and message in captured.err
    assert "torch.distributed.run" not in captured.out and "#SBATCH" not in captured.out


@pytest.mark.parametrize("launch, message", [
    (["torchrun", "--nproc-per-node", "0"], "--nproc-per-node: expected an integer >= 1, found 0"),
    (["slurm", "--nodes", "0"], "--nodes and --procs-per-node must be >= 1, found 0 and 8"),
    (["slurm", "--procs-per-node", "0"], "--nodes and --procs-per-node must be >= 1, found 1 and 0"),
    (["slurm", "--gpus-per-node", "-1"], "--gpus-per-node: expected 0 (CPU nodes) or more, found -1"),
])
def test_launch_refuses_no_processes(repo_root, capsys, launch, message):
    assert main(["launch", *launch, "--dry-run", str(repo_root / "configs/tiny-cpu.yaml")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("time, ok", [
    ("90", True), ("90:30", True), ("01:00:00", True), ("2-12", True), ("2-12:30", True), ("2-12:30:00", True),
    ("UNLIMITED", True), ("infinite", True), ("-1", True),
    ("banana", False), ("1:2:3:4", False), ("2-", False), ("-5", False), ("1h", False), ("", False),
])
def test_slurm_time_limit_is_checked_before_submitting(repo_root, tmp_path, capsys, time, ok):
    assert main(["launch", "slurm", "--time", time, "--dry-run", str(repo_root / "configs/tiny-cpu.yaml"),
                 f"logging.run_dir={tmp_path}"]) == (0 if ok else 2)
    captured = capsys.readouterr()
    if ok:
        assert f"#SBATCH --time={time}\n" in captured.out
    else:
        assert f"--time {time}: expected SLURM's minutes, MM:SS, HH:MM:SS" in captured.err


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    yield from started_cluster(tmp_path_factory)


# ~15 s of training for 2 ranks on 2 cores, about twice that beside the reference run: a USR1
# sent once step 20 is logged lands mid-run
STEPS = 300


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_two_node_job_resumes_and_ends_like_an_uninterrupted_run(slurm, markov_data, tmp_path, repo_root):
    """The generated sbatch on 2 nodes x 1 trainer (DP=2, gloo on CPU, torchrun's c10d
    rendezvous on the first node), preempted with USR1, requeued, resumed from its sharded
    checkpoint; its losses, final weights and validation loss must equal an uninterrupted
    2-process torchrun run's exactly. Exact, not close: on CPU with one thread per rank both
    runs do the same operations in the same order, the resume restores weights, Adam
    moments, every rank's RNG and the data cursor, and a 2-rank all-reduce sums a + b
    whichever node holds rank 0."""
    config = str(repo_root / "configs/tiny-cpu.yaml")
    settings = [f"train.steps={STEPS}", "logging.log_every=1", "checkpoint.every=0", "train.torch_threads=1"]
    run_dir, reference_dir = tmp_path / "job", tmp_path / "reference"
    submitted = subprocess.run(
        [sys.executable, "-m", "mamba_train.cli", "launch", "slurm", "--nodes", "2", "--gpus-per-node", "0",
         "--cpus-per-task", "1", "--time", "10:00", config, *tiny_overrides(markov_data, run_dir, *settings)],
        cwd=repo_root, env=slurm.env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    log, metrics = run_dir / "slurm" / f"tiny-cpu-{job_id}.out", run_dir / "metrics.jsonl"

    def diagnostics() -> str:
        job = slurm.run("scontrol", "show", "job", job_id, check=False).stdout
        return (f"--- job log {log}\n{log.read_text() if log.exists() else '(not written)'}\n"
                f"--- scontrol show job {job_id}\n{job}\n{slurm.logs()}")

    # The uninterrupted reference trains meanwhile on this machine: the same config, 2 processes.
    reference_log = tmp_path / "reference.log"
    with open(reference_log, "w") as out:
        reference = subprocess.Popen(
            [sys.executable, "-m", "mamba_train.cli", "launch", "torchrun", "--nproc-per-node", "2", config,
             *tiny_overrides(markov_data, reference_dir, *settings)],
            cwd=repo_root, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and _lines(metrics) < 20:
            time.sleep(0.2)
        assert _lines(metrics) >= 20, f"the job did not train 20 steps in 120 s\n{diagnostics()}"
        slurm.run("scancel", "--signal=USR1", "--batch", job_id, check=False)
        # The job checkpoints, exits 0 and requeues itself; only a terminal state of the second
        # run counts (the first run's end passes through some).
        state = slurm.finish_requeued_job(job_id, restarted=lambda: "(restart 1)" in log.read_text(), timeout=240)
        assert state == "COMPLETED", f"job {job_id} is {state}\n{diagnostics()}"
        assert reference.wait(timeout=180) == 0, f"the reference run failed:\n{reference_log.read_text()}"
    finally:
        if reference.poll() is None:  # the test failed above: do not leave its trainers behind
            reference.terminate()  # torchrun passes SIGTERM on to the trainers
            try:
                reference.wait(timeout=30)
            except subprocess.TimeoutExpired:
                reference.kill()

    text = log.read_text()
    first, _, second = text.partition("(restart 1)")
    assert f"job {job_id} (restart 0) on n[1-2]" in first and "USR1: asking the trainers" in first, diagnostics()
    saved = re.search(r"USR1: checkpoint saved at step (\d+)", first)
    assert saved and f"requeueing job {job_id}" in first, diagnostics()
    saved_at = int(saved.group(1))
    assert 20 <= saved_at < STEPS
    assert slurm.job_field(job_id, "Restarts") == "1" and slurm.job_field(job_id, "NodeList") == "n[1-2]", diagnostics()
    assert f"resumed from {run_dir / 'ckpt' / f'step_{saved_at:08d}'} at step {saved_at} (" in second, diagnostics()
    assert text.count("2 ranks: tp 1 × cp 1 × dp 2") == 2, diagnostics()  # each start: one rank per node

    # every step's loss once across the two starts: in the job's log and in metrics.jsonl
    assert _logged_steps(text) == list(range(1, STEPS + 1)), diagnostics()
    rows, reference_rows = _rows(metrics), _rows(reference_dir / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert [row["step"] for row in reference_rows] == list(range(1, STEPS + 1))
    losses = {row["step"]: row["loss"] for row in rows}
    reference_losses = {row["step"]: row["loss"] for row in reference_rows}
    different = [step for step in reference_losses if losses[step] != reference_losses[step]]
    assert not different, (f"{len(different)} steps differ from the uninterrupted run, first step {different[0]}: "
                           f"{losses[different[0]]} != {reference_losses[different[0]]}")
    assert losses[STEPS] == reference_losses[STEPS]
    final = f"ckpt/step_{STEPS:08d}/model-tp00.safetensors"
    weights, reference_weights = load_file(run_dir / final), load_file(reference_dir / final)
    assert weights.keys() == reference_weights.keys()
    assert all(torch.equal(weights[name], reference_weights[name]) for name in weights)
    assert _valid_loss(run_dir) == _valid_loss(reference_dir)


def _lines(path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def _logged_steps(log_text: str) -> list[int]:
    return [int(step) for step in re.findall(r"^step +(\d+) \| loss", log_text, flags=re.MULTILINE)]


def _rows(metrics_path) -> list[dict]:
    return [json.loads(line) for line in metrics_path.read_text().splitlines()]


def _valid_loss(run_dir) -> float:
    return json.loads((run_dir / "eval.json").read_text())["overall"]["loss"]
