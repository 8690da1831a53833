"""`scale run`: train a plan's points one after another here, or submit its job array.

Each finished point appends one line to OUT/results.jsonl: its final validation loss
and the tokens and FLOPs it actually spent (steps run × tokens per step × our FLOPs per
token, from the config the run resolved). A point already in results.jsonl is skipped; a
point whose run finished elsewhere (a SLURM task wrote its eval.json) is collected
without training; an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import time
from pathlib import Path
from typing import Callable

from mamba_train.config import RunConfig, config_from_dict, load_config
from mamba_train.launch import slurm
from mamba_train.model import training_flops_per_token
from mamba_train.scaling.plan import ARRAY_SCRIPT, Plan, Point, ScalingError, load_plan

RESULTS_FILE = "results.jsonl"


def read_results(out: str | Path) -> dict[str, dict]:
    """The recorded points by name (a later line for the same point wins)."""
    path = Path(out) / RESULTS_FILE
    results: dict[str, dict] = {}
    if not path.exists():
        return results
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ScalingError(f"{path}:{number}: not a JSON object ({err.msg}); remove or fix that line") from None
        if not isinstance(row, dict) or "name" not in row:
            raise ScalingError(f"{path}:{number}: expected an object with a 'name', found {line[:80]!r}")
        results[row["name"]] = row
    return results


def pending_points(plan: Plan, out: str | Path) -> list[Point]:
    done = read_results(out)
    return [p for p in plan.points if p.name not in done]


def default_train(cfg: RunConfig) -> tuple[int, dict]:
    from mamba_train.train.loop import train

    result = train(cfg, resume="auto")
    if result.step < cfg.train.steps:  # stopped by a signal: checkpointed, not finished
        raise ScalingError(f"{cfg.logging.run_dir}: stopped at step {result.step} of {cfg.train.steps} "
                           f"(stopped by {result.stopped_by or 'a signal'}); rerun `mamba-train scale run` to resume it")
    return result.step, result.eval


def run_plan(out: str | Path, train_fn: Callable[[RunConfig], tuple[int, dict]] = default_train,
             log: Callable[[str], None] = print) -> list[dict]:
    """Train (or collect) every point not yet in results.jsonl; returns the new rows."""
    out = Path(out)
    plan = load_plan(out)
    done = read_results(out)
    new_rows = []
    for point in plan.points:
        if point.name in done:
            log(f"[{point.index + 1}/{len(plan.points)}] {point.name}: done, skipped")
            continue
        cfg = load_config(point.config)
        finished = _finished_elsewhere(cfg)
        if finished is not None:
            step, results, wall = *finished, None
            log(f"[{point.index + 1}/{len(plan.points)}] {point.name}: finished by another job, collected")
        else:
            log(f"[{point.index + 1}/{len(plan.points)}] {point.name}: {point.params:,} params, {point.steps} steps "
                f"of {plan.tokens_per_step} tokens ({point.flops:.3g} FLOPs)")
            started = time.perf_counter()
            step, results = train_fn(cfg)
            wall = time.perf_counter() - started
        row = result_row(point, cfg, step, results, wall)
        with open(out / RESULTS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        new_rows.append(row)
        loss = "not finite: the run failed" if row["loss"] is None else f"{row['loss']:.4f}"
        log(f"    valid loss {loss} | {row['tokens']:,} tokens | {row['flops']:.3g} FLOPs"
            + (f" | {wall:.0f} s" if wall is not None else ""))
    return new_rows


def result_row(point: Point, cfg: RunConfig, step: int, results: dict | None, wall: float | None) -> dict:
    loss = None if results is None else results["overall"]["loss"]
    if loss is not None and not math.isfinite(loss):
        loss = None
    vocab = cfg.model.padded_vocab_size(cfg.parallel.tp)
    flops_per_token = training_flops_per_token(cfg.model, vocab)
    tokens = step * cfg.train.micro_batch * cfg.train.grad_accum * cfg.data.seq_len
    row = {"index": point.index, "name": point.name, "budget": point.budget, "d_model": cfg.model.d_model,
           "n_layer": cfg.model.n_layer, "params": point.params, "flops_per_token": flops_per_token,
           "steps": step, "tokens": tokens, "flops": flops_per_token * tokens, "loss": loss}
    if results is not None:
        row["bpb"] = results["overall"].get("bpb")  # a parallel run's evaluation has no bpb
    if wall is not None:
        row["wall_s"] = round(wall, 1)
    return row


def _finished_elsewhere(cfg: RunConfig) -> tuple[int, dict] | None:
    """(step, eval results) of a run that completed in another process, else None."""
    eval_path = Path(cfg.logging.run_dir) / "eval.json"
    latest = Path(cfg.checkpoint.dir) / "latest"
    if not eval_path.exists() or not latest.exists():
        return None
    state_path = Path(cfg.checkpoint.dir) / latest.read_text().strip() / "trainer_state.json"
    state = json.loads(state_path.read_text())
    if state["step"] < cfg.train.steps:
        return None
    saved = config_from_dict(state["config"])
    if saved.model != cfg.model:
        raise ScalingError(f"{state_path}: the run in {cfg.logging.run_dir} trained another model than its config "
                           f"describes; remove that run directory and run the point again")
    return state["step"], json.loads(eval_path.read_text())


def submit_command(plan: Plan, out: str | Path, sbatch_options: list[str] = ()) -> list[str]:
    """sbatch restricted to the points not finished yet (--array on the command line
    overrides the script's #SBATCH --array)."""
    return slurm.sbatch_command(Path(out) / ARRAY_SCRIPT, [_array_option(plan, out), *sbatch_options])


def _array_option(plan: Plan, out: str | Path) -> str:
    pending = pending_points(plan, out)
    if not pending:
        raise ScalingError(f"{out}: every point of the plan has a result; nothing to submit")
    return f"--array={','.join(str(p.index) for p in pending)}"


def submit(out: str | Path, sbatch_options: list[str] = (), log: Callable[[str], None] = print) -> str:
    """Submits the job array of the unfinished points; returns its job id."""
    plan = load_plan(out)
    options = [_array_option(plan, out), *sbatch_options]
    if shutil.which("sbatch") is None:
        raise ScalingError("sbatch is not on PATH: submit from a SLURM login node, or train the points here with "
                           f"`mamba-train scale run {out}` (sequential)")
    log_dir = Path(out).resolve() / "logs"
    log_dir.mkdir(exist_ok=True)  # SLURM does not create the directory of --output
    script = Path(out) / ARRAY_SCRIPT
    log(shlex.join(slurm.sbatch_command(script, options)))
    try:
        job_id = slurm.submit(script, options)
    except slurm.LaunchError as err:
        raise ScalingError(str(err)) from None
    log(f"submitted job array {job_id} ({options[0]}); logs in {log_dir}/\n"
        f"when the array is done: `mamba-train scale run {out}` collects the results, then `scale fit {out}`")
    return job_id
