"""The training run, top to bottom: config → model → optimizer → data → resume → loop.

One process on CPU or one GPU; the parallel engine (DeepSpeed, megatron-core groups)
plugs in at `build_model` / `build_optimizer` without changing the loop's shape.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from mamba_train.checkpoint import (has_checkpoints, load_checkpoint, read_trainer_state, resolve_resume,
                                    save_checkpoint)
from mamba_train.config import RunConfig
from mamba_train.data import IndexedDataset, PackedSamples, TrainLoader, load_tokenizer
from mamba_train.eval import evaluate, format_table
from mamba_train.model import Mamba2LM, param_groups, training_flops_per_token
from mamba_train.train.metrics import MetricsLogger, peak_flops
from mamba_train.train.preemption import StopRequest
from mamba_train.train.schedule import lr_at


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a checkpoint that does not fit the config)."""


@dataclass
class TrainResult:
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    eval: dict | None = None
    checkpoint: Path | None = None
    stopped_by: str | None = None  # the signal that ended the run early, if any


def pick_device(cfg: RunConfig) -> torch.device:
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but torch sees no CUDA device")
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def autocast_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast over fp32 parameters (fp32 master weights) on GPU; plain fp32 on CPU."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def resolve_vocab(cfg: RunConfig) -> None:
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = load_tokenizer(cfg.data.tokenizer).vocab_size


def train(cfg: RunConfig, resume: str | None = None, stop_after_steps: int | None = None) -> TrainResult:
    """Train until `train.steps` (or `stop_after_steps` more steps, as a preempted job
    would: checkpoint and return). `resume`: None, "auto" or a checkpoint directory."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or cfg.parallel.tp > 1 or cfg.parallel.cp > 1:
        # mamba_train.parallel has the layers; until the loop drives them, N independent
        # processes would train N copies into one checkpoint directory.
        raise TrainingError(f"this trainer runs one process (WORLD_SIZE={world}, parallel.tp={cfg.parallel.tp}, "
                            f"parallel.cp={cfg.parallel.cp}); launch with one process per job for now")
    resolve_vocab(cfg)
    device = pick_device(cfg)
    amp_dtype = autocast_dtype(cfg, device)
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)

    model = Mamba2LM(cfg.model).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                                  fused=device.type == "cuda")

    samples = PackedSamples(IndexedDataset(cfg.data.train_prefix), cfg.data.seq_len)
    samples.check_vocab(model.vocab_size)

    run_dir = Path(cfg.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    step, consumed_samples, skipped = 0, 0, 0
    checkpoint = resolve_resume(cfg.checkpoint.dir, resume)
    if checkpoint is not None:
        _check_same_model(cfg, read_trainer_state(checkpoint)["config"], checkpoint)
        state = load_checkpoint(checkpoint, model, optimizer, map_location=device, verify=False)  # resolved: verified
        step, consumed_samples, skipped = state["step"], state["consumed_samples"], state.get("skipped_steps", 0)
        _set_rng_state(state["rng"])
        print(f"resumed from {checkpoint} at step {step} ({consumed_samples} samples consumed)", flush=True)
    elif resume is None and has_checkpoints(cfg.checkpoint.dir):
        raise TrainingError(f"{cfg.checkpoint.dir} already holds checkpoints of another run: pass --resume auto to "
                            f"continue it, or set checkpoint.dir (and logging.run_dir) to a new directory")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    loader = TrainLoader(samples, cfg.train.micro_batch, seed=cfg.data.seed, consumed_samples=consumed_samples)
    tokens_per_step = cfg.train.micro_batch * cfg.train.grad_accum * cfg.data.seq_len
    flops_per_step = training_flops_per_token(cfg.model, model.vocab_size) * tokens_per_step
    peak = peak_flops(device, cfg.logging.peak_flops)
    metrics = MetricsLogger(cfg.logging, total_steps=cfg.train.steps, start_step=step)
    metrics.info(f"model: {sum(p.numel() for p in model.parameters()):,} parameters | device {device} | "
                 f"{tokens_per_step:,} tokens/step | {samples.num_samples:,} training samples of {cfg.data.seq_len}")
    result = TrainResult(step=step)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext

    def save() -> Path:
        trainer_state = {"step": step, "consumed_samples": loader.consumed_samples, "skipped_steps": skipped,
                         "config": cfg.to_dict(), "rng": _rng_state()}
        return save_checkpoint(cfg.checkpoint.dir, step, model, optimizer, trainer_state,
                               cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)

    stop = StopRequest()
    try:
        model.train()
        last_step = cfg.train.steps if stop_after_steps is None else min(cfg.train.steps, step + stop_after_steps)
        while step < last_step:
            started = time.perf_counter()
            lr = lr_at(step, cfg.optim, cfg.train.steps)
            loss_value, grad_norm = _train_step(cfg, model, optimizer, loader, lr, device, amp)
            if grad_norm is None:
                # A non-finite loss or gradient: drop this step's update (its batches are consumed
                # and not retried) and go on, a bounded number of times.
                skipped += 1
                metrics.info(f"step {step + 1}: non-finite loss or gradient ({loss_value}); update skipped "
                             f"({skipped} of at most {cfg.train.max_skipped_steps})")
                if skipped > cfg.train.max_skipped_steps:
                    raise TrainingError(f"{skipped} steps with a non-finite loss or gradient (train.max_skipped_steps "
                                        f"= {cfg.train.max_skipped_steps}); stopping at step {step}. The last good "
                                        f"checkpoint in {cfg.checkpoint.dir} is intact: lower optim.lr or check the data.")
                continue
            step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - started
            row = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / elapsed}
            if peak:
                row["mfu"] = flops_per_step / elapsed / peak
            if device.type == "cuda":
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            result.losses[step] = loss_value
            metrics.log_step(step, row)
            if stop.requested():
                result.checkpoint, result.step, result.stopped_by = save(), step, stop.name
                metrics.info(f"{stop.name}: checkpoint saved at step {step}; exiting (continue with --resume auto)")
                return result
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < last_step:
                result.checkpoint = save()
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                metrics.log_eval(step, _evaluate(cfg, model, device, amp_dtype, cfg.train.eval_batches))
        result.checkpoint = save()
        if step < cfg.train.steps:
            metrics.info(f"stopped at step {step} of {cfg.train.steps}; continue with --resume auto")
            result.step = step
            return result
        result.eval = _evaluate(cfg, model, device, amp_dtype, max_batches=None)
        metrics.log_eval(step, result.eval)
        (run_dir / "eval.json").write_text(json.dumps(result.eval, indent=1))
        metrics.info(format_table(result.eval))
    finally:
        stop.close()
        metrics.close()
    result.step = step
    return result


def _train_step(cfg: RunConfig, model, optimizer, loader, lr: float, device, amp) -> tuple[float, float | None]:
    """Forward/backward over `grad_accum` micro-batches, clip, update. Returns the mean
    loss and the gradient norm, or None for the norm when the step was not applied
    because the loss or the gradient is not finite."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = 0.0
    for _ in range(cfg.train.grad_accum):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
        with amp():
            loss = model.loss(batch["input_ids"], batch["labels"], seq_idx=batch["seq_idx"])
        (loss / cfg.train.grad_accum).backward()
        loss_sum += loss.item()
    loss_value = loss_sum / cfg.train.grad_accum
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
    applied = math.isfinite(loss_value) and math.isfinite(grad_norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm if applied else None


def _evaluate(cfg: RunConfig, model, device, amp_dtype, max_batches: int | None) -> dict:
    valid = IndexedDataset(cfg.data.valid_prefix)
    max_tokens = None if max_batches is None else max_batches * cfg.train.micro_batch * cfg.data.seq_len
    return evaluate(model, valid, window=cfg.data.seq_len, max_tokens=max_tokens, device=device,
                    autocast_dtype=amp_dtype)


def _check_same_model(cfg: RunConfig, saved: dict, checkpoint: Path) -> None:
    current = cfg.to_dict()["model"]
    different = {k: (saved["model"].get(k), v) for k, v in current.items() if saved["model"].get(k) != v}
    if different:
        details = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in different.items())
        raise TrainingError(f"{checkpoint} was written by another model: {details}")


def _rng_state() -> dict:
    state = {"python": _jsonable(random.getstate()), "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value
