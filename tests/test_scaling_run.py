"""`scale run` and `scale fit` through the CLI: points are trained in order and recorded
with the tokens and FLOPs they actually spent, finished points are skipped on rerun,
and the fit writes its report and plots, or refuses incomplete results by name."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mamba_train.cli import main
from mamba_train.model import training_flops_per_token
from mamba_train.scaling import load_plan, read_results, run_plan
from mamba_train.scaling.run import submit_command

from test_scaling_fit import TRUE
from test_scaling_plan import BUDGETS, write_tiny_base



@pytest.fixture
def sweep(tmp_path):
    write_tiny_base(tmp_path)
    budgets = ",".join(str(b) for b in BUDGETS)
    assert main(["scale", "plan", "--tiny", "--budgets", budgets, "--base", str(tmp_path / "base.yaml"),
                 "--out", str(tmp_path / "sweep"), "--valid-tokens", "0"]) == 0
    return tmp_path / "sweep"


def law_trainer(calls):
    """A stand-in for training: runs every step but the last, and reports the known law's
    loss at the tokens it saw (so the recorded tokens must be the ones actually run)."""
    def train(cfg):
        calls.append(cfg.logging.run_dir)
        steps = cfg.train.steps - 1
        vocab = cfg.model.padded_vocab_size()
        params = training_flops_per_token(cfg.model, vocab) / 6  # any smooth N works for the stand-in
        tokens = steps * cfg.train.micro_batch * cfg.data.seq_len
        return steps, {"overall": {"loss": float(TRUE(params, tokens)), "bpb": 1.0}}
    return train


def test_run_records_actual_tokens_and_flops_and_skips_finished_points(sweep):
    calls = []
    rows = run_plan(sweep, train_fn=law_trainer(calls), log=lambda _: None)
    plan = load_plan(sweep)
    assert len(rows) == len(calls) == len(plan.points)
    for point, row in zip(plan.points, rows):
        assert row["steps"] == point.steps - 1 and row["tokens"] == (point.steps - 1) * plan.tokens_per_step
        assert row["flops"] == point.flops_per_token * row["tokens"]
    assert run_plan(sweep, train_fn=law_trainer(calls), log=lambda _: None) == []  # nothing left to do
    assert len(calls) == len(plan.points)


def test_an_interrupted_sweep_continues_where_it_stopped(sweep):
    calls = []
    trainer = law_trainer(calls)

    def crash_on_fourth(cfg):
        if len(calls) == 3:
            raise KeyboardInterrupt
        return trainer(cfg)

    with pytest.raises(KeyboardInterrupt):
        run_plan(sweep, train_fn=crash_on_fourth, log=lambda _: None)
    assert len(read_results(sweep)) == 3
    plan = load_plan(sweep)
    assert submit_command(plan, sweep, ["--partition=gpu"]) == [
        "sbatch", "--parsable", "--array=" + ",".join(str(i) for i in range(3, len(plan.points))), "--partition=gpu",
        str(sweep / "sweep.sbatch")]
    run_plan(sweep, train_fn=trainer, log=lambda _: None)
    assert len(read_results(sweep)) == len(plan.points) and len(calls) == len(plan.points)  # each trained once


def test_fit_writes_the_report_and_three_plots(sweep, tmp_path, capsys):
    run_plan(sweep, train_fn=law_trainer([]), log=lambda _: None)
    assert main(["scale", "fit", str(sweep), "--report", str(tmp_path / "report"), "--bootstrap", "3"]) == 0
    report = (tmp_path / "report/report.md").read_text()
    for name in ("isoflop.png", "optimal.png", "contours.png"):
        assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG" and f"({name})" in report
    assert "| approach 3: α |" in report and "| 0.34 |" in report and "| 406.4 |" in report
    fitted = json.loads((tmp_path / "report/fit.json").read_text())
    assert np.isfinite(fitted["approach2"]["a"]) and len(fitted["approach2"]["minima"]) == 3
    assert "approach 2: N_opt ∝ C^" in capsys.readouterr().out


def test_fit_names_the_points_without_results(sweep, capsys):
    run_plan(sweep, train_fn=law_trainer([]), log=lambda _: None)
    lines = (sweep / "results.jsonl").read_text().splitlines()
    (sweep / "results.jsonl").write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    missing = load_plan(sweep).points[2].name
    assert main(["scale", "fit", str(sweep)]) == 2
    assert f"no result for 1 of 15 point(s): {missing}; run `mamba-train scale run" in capsys.readouterr().err


def test_a_diverged_point_is_recorded_and_the_fit_names_it(sweep, capsys):
    trainer = law_trainer([])

    def diverge_on_point_5(cfg):
        steps, results = trainer(cfg)
        if "/runs/" + load_plan(sweep).points[5].name in cfg.logging.run_dir:
            results = {"overall": {"loss": float("nan"), "bpb": float("nan")}}
        return steps, results

    run_plan(sweep, train_fn=diverge_on_point_5, log=lambda _: None)
    assert main(["scale", "fit", str(sweep)]) == 2
    assert f"non-finite final loss at point(s) {load_plan(sweep).points[5].name}" in capsys.readouterr().err


def test_plan_without_budgets_and_run_of_a_missing_plan_are_refused(tmp_path, capsys):
    assert main(["scale", "plan", "--out", str(tmp_path / "x")]) == 2
    assert "--budgets: give the FLOP budgets" in capsys.readouterr().err
    assert main(["scale", "run", str(tmp_path / "nothing")]) == 2
    assert "no plan here" in capsys.readouterr().err


def test_a_point_trained_by_an_array_task_is_collected_not_retrained(sweep_dir_with_real_point):
    out, trained = sweep_dir_with_real_point
    calls = []
    rows = run_plan(out, train_fn=law_trainer(calls), log=lambda _: None)
    assert trained.logging.run_dir not in calls and len(calls) == len(rows) - 1
    collected = next(r for r in rows if r["name"] == load_plan(out).points[0].name)
    eval_loss = json.loads((Path(trained.logging.run_dir) / "eval.json").read_text())["overall"]["loss"]
    assert collected["loss"] == eval_loss and collected["steps"] == trained.train.steps
    assert collected["flops"] == training_flops_per_token(trained.model, 256) * collected["tokens"]


@pytest.fixture
def sweep_dir_with_real_point(tmp_path):
    """A small plan whose point 0 really trains (10 steps of the 4-wide model), as the
    job array's task 0 would: `mamba-train train <its config>`."""
    from mamba_train.config import load_config
    from mamba_train.scaling import make_plan, write_plan

    # 256 tokens per step: 10 steps of the 4-wide model at 4.5e7 FLOPs
    write_tiny_base(tmp_path, train={"micro_batch": 4})
    plan, base_cfg = make_plan([4.5e7, 9e7], 3, tmp_path / "base.yaml", tiny=True, min_steps=2)
    out = write_plan(plan, base_cfg, tmp_path / "sweep", valid_tokens=600)
    assert plan.points[0].steps == 10
    assert main(["train", plan.points[0].config]) == 0
    return out, load_config(plan.points[0].config)


def test_fit_without_bracketed_minima_reports_approach2_as_not_determined(sweep, tmp_path, capsys):
    def smaller_is_better(cfg):  # as in the tiny CPU sweep: loss grows with size at every budget
        steps = cfg.train.steps
        return steps, {"overall": {"loss": 6.0 + 0.1 * cfg.model.d_model ** 0.5 - 1e-7 * steps, "bpb": 1.0}}

    run_plan(sweep, train_fn=smaller_is_better, log=lambda _: None)
    assert main(["scale", "fit", str(sweep), "--report", str(tmp_path / "report"), "--bootstrap", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("warning: budget") == 3 and "approach 2: not determined (0 of 3 budgets" in out
    report = (tmp_path / "report/report.md").read_text()
    assert "not determined: fewer than 2 budgets" in report and "the smallest model trained has the lowest loss" in report
    assert json.loads((tmp_path / "report/fit.json").read_text())["approach2"]["a"] is None


def fake_sbatch(tmp_path, monkeypatch, body):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/sbatch-args\n{body}\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_submit_sends_the_unfinished_points_and_prints_the_array_id(sweep, tmp_path, monkeypatch, capsys):
    run_plan(sweep, train_fn=law_trainer([]), log=lambda _: None)
    lines = (sweep / "results.jsonl").read_text().splitlines()
    (sweep / "results.jsonl").write_text("\n".join(lines[:-2]) + "\n")  # the last two points have no result
    fake_sbatch(tmp_path, monkeypatch, "echo 4242")
    assert main(["scale", "run", str(sweep), "--submit", "--sbatch=--time=1:00:00"]) == 0
    assert "submitted job array 4242 (--array=13,14)" in capsys.readouterr().out
    assert (tmp_path / "sbatch-args").read_text().split() == ["--parsable", "--array=13,14", "--time=1:00:00",
                                                              str(sweep / "sweep.sbatch")]
    assert (sweep / "logs").is_dir()  # SLURM would not create the directory of its --output


def test_a_refused_submission_says_what_sbatch_said(sweep, tmp_path, monkeypatch, capsys):
    fake_sbatch(tmp_path, monkeypatch, "echo 'sbatch: error: invalid partition specified: gpu' >&2; exit 1")
    assert main(["scale", "run", str(sweep), "--submit", "--sbatch=--partition=gpu"]) == 2
    assert "failed: sbatch: error: invalid partition specified: gpu" in capsys.readouterr().err
