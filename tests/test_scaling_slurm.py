"""`scale run --submit` on a real two-node SLURM (tests/slurm_cluster.py): the job array,
rendered from launch/slurm.sbatch, trains every point of a tiny plan; one task preempted
with USR1 checkpoints, requeues itself and finishes from its checkpoint; `scale run` then
collects what the tasks wrote, without training, and `scale fit` fits it."""

import json
import math
import re
import subprocess
import time
from pathlib import Path

import pytest

from mamba_train.cli import main
from mamba_train.config import load_config
from mamba_train.scaling import load_plan, read_results
from slurm_cluster import TERMINAL_STATES, started_cluster
from test_scaling_plan import write_tiny_base



@pytest.fixture
def tiny_sweep(markov_data, tmp_path):
    """2 budgets x 3 sizes (the smallest plan `scale plan` makes) of the tiny CPU rule on the
    Markov data: 49 to 544 steps of 256 tokens, each point a few seconds on 2 cores."""
    # 256 tokens per step, whatever the tiny sweep's batch
    write_tiny_base(tmp_path, markov_data / "train", markov_data / "valid", vocab_size=64,
                    logging={"log_every": 1}, train={"torch_threads": 1, "micro_batch": 4})
    out = tmp_path / "sweep"
    assert main(["scale", "plan", "--tiny", "--budgets", "1e9,2e9", "--sizes", "3", "--base", str(tmp_path / "base.yaml"),
                 "--out", str(out), "--valid-tokens", "600", "--min-steps", "2"]) == 0
    return out



@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    yield from started_cluster(tmp_path_factory)


@pytest.mark.slurm
@pytest.mark.slow
def test_submitted_sweep_trains_every_point_and_a_preempted_task_resumes(slurm, tiny_sweep, monkeypatch, capsys,
                                                                         tmp_path):
    out, plan = tiny_sweep, load_plan(tiny_sweep)
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))  # sbatch, and through it the tasks, use the test cluster
    capsys.readouterr()
    # one CPU per task: four tasks at a time on the two 2-CPU nodes
    assert main(["scale", "run", str(out), "--submit", "--sbatch=--cpus-per-task=1"]) == 0
    array_id = re.search(r"submitted job array (\d+) \(--array=0,1,2,3,4,5\)", capsys.readouterr().out).group(1)

    def logs() -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text()}" for path in sorted((out / "logs").glob("*.out")))

    # preempt the longest point once it trains (its USR1 handler is installed by then)
    longest = max(plan.points, key=lambda p: p.steps)
    task = f"{array_id}_{longest.index}"
    metrics = run_dir(longest) / "metrics.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 5):
        time.sleep(0.2)
    assert metrics.exists(), f"task {task} never started training\n{logs()}\n{slurm.logs()}"
    # While tasks of the array still wait in the queue, SLURM 22.05 delivers `scancel --signal`
    # to a running task but answers "Job can not be altered now" and retries, signalling again
    # every few seconds: stop scancel once the task has the signal.
    log = out / "logs" / f"scale-sweep-{task}.out"
    scancel = subprocess.Popen(["scancel", "--signal=USR1", "--batch", task], env=slurm.env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline and "USR1: asking the trainers" not in log.read_text():
        time.sleep(0.1)
    scancel.terminate()
    scancel.wait()
    assert "USR1: asking the trainers" in log.read_text(), f"task {task} never got USR1\n{logs()}"
    state = slurm.finish_requeued_job(task, restarted=lambda: log.exists() and "(restart 1)" in log.read_text(),
                                      timeout=120)
    assert state == "COMPLETED", f"task {task} is {state}\n{logs()}"

    deadline = time.time() + 120
    while time.time() < deadline:
        states = slurm.array_states(array_id)
        if len(states) == len(plan.points) and set(states.values()) <= TERMINAL_STATES:
            break
        time.sleep(0.5)
    assert states == {str(p.index): "COMPLETED" for p in plan.points}, f"{states}\n{logs()}\n{slurm.logs()}"

    text = log.read_text()
    saved_at = int(re.search(r"USR1: checkpoint saved at step (\d+)", text).group(1))
    assert 0 < saved_at < longest.steps and "requeueing job" in text
    assert "(restart 1)" in text and f"at step {saved_at} (" in text.split("(restart 1)")[1]  # "resumed from ... at step N"
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, longest.steps + 1)), "the requeued task must continue from its checkpoint"
    for point in plan.points:
        assert (run_dir(point) / "metrics.jsonl").exists() and (run_dir(point) / "eval.json").exists(), point.name
        latest = (run_dir(point) / "checkpoints" / "latest").read_text().strip()
        assert latest == f"step_{point.steps:08d}", point.name

    # collect: every point finished in SLURM, so `scale run` trains nothing
    assert main(["scale", "run", str(out)]) == 0
    assert capsys.readouterr().out.count("finished by another job, collected") == len(plan.points)
    results = read_results(out)
    assert sorted(results) == sorted(p.name for p in plan.points)
    for point in plan.points:
        row = results[point.name]
        assert row["steps"] == point.steps and math.isfinite(row["loss"]) and "wall_s" not in row
        eval_loss = json.loads((run_dir(point) / "eval.json").read_text())["overall"]["loss"]
        assert row["loss"] == eval_loss

    assert main(["scale", "fit", str(out), "--report", str(tmp_path / "report"), "--bootstrap", "2"]) == 0
    assert (tmp_path / "report" / "report.md").exists()
    fitted = json.loads((tmp_path / "report" / "fit.json").read_text())
    assert [m["budget"] for m in fitted["approach2"]["minima"]] == plan.budgets


def run_dir(point) -> Path:
    return Path(load_config(point.config).logging.run_dir)
