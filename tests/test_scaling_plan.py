"""`scale plan`: shapes from one TP-valid rule, tokens from our exact FLOP count, one
loadable config per point, a job-array script that trains point $SLURM_ARRAY_TASK_ID,
and clear refusals of budgets and grids that cannot work."""

import os
import stat
import subprocess

from pathlib import Path

import numpy as np
import pytest
import yaml

from mamba_train.config import ModelConfig, load_config
from mamba_train.data import IndexedDatasetWriter
from mamba_train.model import training_flops_per_token
from mamba_train.scaling import ScalingError, load_plan, make_plan, write_plan
from mamba_train.scaling.plan import parse_budgets
from mamba_train.scaling.shapes import ShapeRule

PILE_VOCAB = 50277
REPO_ROOT = Path(__file__).resolve().parents[1]
BUDGETS = [1e10, 3e10, 1e11]  # tiny shapes with a 256-token vocabulary: 5 sizes each


@pytest.fixture(scope="module")
def real_plan():
    return make_plan([1e17, 3e17, 1e18], 7, REPO_ROOT / "configs/130m.yaml", tp=4, vocab_size=PILE_VOCAB)


def test_shapes_follow_one_rule_and_are_valid_for_tensor_parallelism(real_plan):
    plan, _ = real_plan
    assert len(plan.points) == 21 and plan.vocab_size % (128 * 4) == 0
    for point in plan.points:
        assert point.n_layer == max(2, round(point.d_model / 32)), point.name
        nheads = 2 * point.d_model // 64
        assert nheads % 4 == 0, point.name  # heads and groups (ngroups = tp) split evenly over 4 ranks
    for budget in plan.budgets:
        params = [p.params for p in plan.points if p.budget == budget]
        assert params == sorted(params) and len(set(params)) == 7 and 8 <= params[-1] / params[0] <= 32  # --span 16, snapped to the ladder


def test_tokens_come_from_the_exact_flop_count(real_plan):
    plan, base = real_plan
    for point in plan.points:
        model = ShapeRule(tp=4).model(point.d_model, base.model)
        per_token = training_flops_per_token(model, plan.vocab_size)
        assert point.flops_per_token == per_token and point.flops == per_token * point.tokens
        assert point.tokens == point.steps * plan.tokens_per_step
        assert abs(point.flops - point.budget) <= per_token * plan.tokens_per_step / 2  # rounded to whole steps


def test_the_rule_gives_the_130m_shape_with_its_hand_counted_flops():
    plan, _ = make_plan([1e18, 3e18], 3, REPO_ROOT / "configs/130m.yaml", vocab_size=PILE_VOCAB, span=1.5)
    point = next(p for p in plan.points if p.d_model == 768)
    assert point.n_layer == 24 and point.params == 129_001_920  # counted by hand in tests/test_model.py
    assert point.flops_per_token == training_flops_per_token(ModelConfig(vocab_size=PILE_VOCAB), 50304)


def synthetic_valid(prefix, n_docs=30):
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix) as writer:
        for i in range(n_docs):
            tokens = rng.integers(1, 200, size=int(rng.integers(50, 400)))
            writer.add_document(tokens, utf8_bytes=3 * len(tokens), subset=("code", "prose", "man")[i % 3])


def write_tiny_base(tmp_path, train_prefix=None, valid_prefix=None, vocab_size=256, **sections) -> Path:
    """configs/scaling/tiny.yaml on test data (one synthetic set for both when no prefixes are
    given), with `sections` ({"train": {...}, ...}) merged in; returns the written base.yaml."""
    if train_prefix is None:
        train_prefix = valid_prefix = tmp_path / "valid"
        synthetic_valid(train_prefix)
    base = yaml.safe_load((REPO_ROOT / "configs/scaling/tiny.yaml").read_text())
    base["data"].update(train_prefix=str(train_prefix), valid_prefix=str(valid_prefix))
    base["model"]["vocab_size"] = vocab_size
    for section, values in sections.items():
        base[section].update(values)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    return tmp_path / "base.yaml"


@pytest.fixture
def tiny_base(tmp_path):
    return write_tiny_base(tmp_path)


def test_tiny_plan_writes_a_loadable_config_per_point_and_a_validation_sample(tiny_base, tmp_path):
    plan, base = make_plan(BUDGETS, 5, tiny_base, tiny=True)
    out = write_plan(plan, base, tmp_path / "sweep", valid_tokens=2000)
    assert load_plan(out).points == plan.points
    for budget in plan.budgets:
        assert sum(p.budget == budget for p in plan.points) == 5
    for point in plan.points:
        cfg = load_config(point.config)
        assert (cfg.model.d_model, cfg.model.n_layer, cfg.train.steps) == (point.d_model, point.n_layer, point.steps)
        assert cfg.optim.warmup_steps == max(1, round(point.steps / 10)) and cfg.logging.run_dir.endswith(point.name)
    from mamba_train.data import IndexedDataset

    sample = IndexedDataset(out / "data" / "valid-sample")
    assert sample.num_tokens <= 2000 and set(sample.subset_names) == {"code", "prose", "man"}


def fake_slurm_tools(bin_dir, trainer_body):
    """Stand-ins for srun (runs `trainer_body` with CONFIG set to the config after `train`) and
    scontrol (prints its arguments; `show hostnames` prints n1), so the array script can run
    outside SLURM."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nfor a; do [ "$prev" = train ] && CONFIG=$a; prev=$a; done\n'
                                  + trainer_body)
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1" = show ] && { echo n1; exit 0; }\necho "scontrol $@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1",
            "SLURM_ARRAY_JOB_ID": "77", "SLURM_JOB_ID": "80"}


def test_array_script_trains_the_config_of_its_task_id(tiny_base, tmp_path):
    plan, base = make_plan(BUDGETS, 5, tiny_base, tiny=True)
    out = write_plan(plan, base, tmp_path / "sweep")
    script = (out / "sweep.sbatch").read_text()
    assert f"#SBATCH --array=0-{len(plan.points) - 1}\n" in script
    assert f"#SBATCH --output={out}/logs/%x-%A_%a.out\n" in script
    assert '-m mamba_train.cli train "$config" --resume auto &' in script
    env = fake_slurm_tools(tmp_path / "bin", 'echo "train $CONFIG"\n')
    done = subprocess.run(["bash", str(out / "sweep.sbatch")], env={**env, "SLURM_ARRAY_TASK_ID": "7"},
                          capture_output=True, text=True, check=True)
    assert f"train {Path(plan.points[7].config).resolve()}\n" in done.stdout
    beyond = subprocess.run(["bash", str(out / "sweep.sbatch")], env={**env, "SLURM_ARRAY_TASK_ID": "15"},
                            capture_output=True, text=True)
    assert beyond.returncode == 2 and "no run config for array task 15; this script holds 15" in beyond.stderr


def test_array_and_single_job_scripts_come_from_one_template(tiny_base, tmp_path):
    from mamba_train.launch.slurm import SlurmJob, render_array_sbatch, render_sbatch

    job = SlurmJob(job_name="j", log_dir=tmp_path / "logs", cpus_per_task=2)
    single = render_sbatch(job, tmp_path / "run.yaml").splitlines()
    array = render_array_sbatch(job, [tmp_path / "run.yaml"]).splitlines()
    # everything but the log name and the config the trainers get is the same text
    assert set(single) - set(array) == {f"#SBATCH --output={tmp_path}/logs/%x-%j.out",
                                        f"  -m mamba_train.cli train {tmp_path}/run.yaml --resume auto &"}
    assert set(array) - set(single) >= {"#SBATCH --array=0-0", 'config=${configs[$SLURM_ARRAY_TASK_ID]}'}
    assert '  scontrol requeue "$SLURM_JOB_ID"' in array and "trap forward_stop USR1" in array


def test_replanning_into_a_directory_with_another_plan_is_refused(tiny_base, tmp_path):
    plan, base = make_plan(BUDGETS, 5, tiny_base, tiny=True)
    write_plan(plan, base, tmp_path / "sweep")
    write_plan(*make_plan(BUDGETS, 5, tiny_base, tiny=True), tmp_path / "sweep")  # same plan: fine
    with pytest.raises(ScalingError, match="already holds a different plan"):
        write_plan(*make_plan(BUDGETS[:2], 5, tiny_base, tiny=True), tmp_path / "sweep")


def test_a_budget_too_small_for_the_smallest_model_is_named(tiny_base):
    with pytest.raises(ScalingError, match=r"budget 1e\+06 FLOPs is too small for the smallest model \(d_model 4"):
        make_plan([1e6, 1e11], 5, tiny_base, tiny=True)


def test_a_budget_with_room_for_fewer_than_3_sizes_is_named(tiny_base):
    with pytest.raises(ScalingError, match=r"budget 8e\+08 FLOPs: only 2 model size\(s\) get 10 steps"):
        make_plan([8e8, 1e11], 5, tiny_base, tiny=True)


@pytest.mark.parametrize("text, message", [("1e17,abc", "'abc' is not a number"), ("1e17", "at least 2 budgets"),
                                           ("1e17,-3", "positive FLOP counts"), ("1e17,1e17", "repeats a budget")])
def test_bad_budgets_are_refused(text, message):
    with pytest.raises(ScalingError, match=message):
        parse_budgets(text)


def test_fewer_than_3_sizes_is_refused(tiny_base):
    with pytest.raises(ScalingError, match="at least 3 model sizes, found 2"):
        make_plan(BUDGETS, 2, tiny_base, tiny=True)


def test_array_task_told_to_stop_checkpoints_and_requeues_itself(tiny_base, tmp_path):
    import signal
    import time

    plan, base = make_plan(BUDGETS, 5, tiny_base, tiny=True)
    out = write_plan(plan, base, tmp_path / "sweep")
    # a trainer that stops cleanly on USR1 (as train() does at a step boundary)
    env = fake_slurm_tools(tmp_path / "bin", 'trap \'echo "checkpointed $CONFIG"; exit 0\' USR1\n'
                                             'echo started; for i in $(seq 100); do sleep 0.1; done\n')
    task = subprocess.Popen(["bash", str(out / "sweep.sbatch")], env={**env, "SLURM_ARRAY_TASK_ID": "2"},
                            stdout=subprocess.PIPE, text=True)
    while (line := task.stdout.readline()) and line.strip() != "started":
        pass
    time.sleep(0.3)
    task.send_signal(signal.SIGUSR1)
    output, _ = task.communicate(timeout=20)
    assert task.returncode == 0
    lines = [line for line in output.splitlines() if not line.startswith("[")]  # the script's own timestamped log
    assert lines == [f"checkpointed {Path(plan.points[2].config).resolve()}", "scontrol requeue 80"]
