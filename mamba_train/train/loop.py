"""The training run, top to bottom: config → trainer → resume → data → loop.

A trainer owns the model and the optimizer: it builds them, takes one optimizer step
over `grad_accum` micro-batches, saves (through a `CheckpointWriter`: here or in the
background) and loads checkpoints and scores the validation data. `SingleProcessTrainer` (below) runs one process on CPU or one GPU;
`ParallelTrainer` (parallel_trainer.py) runs one rank of a torchrun job of any
TP × CP × DP layout through megatron-core's groups and DeepSpeed ZeRO. The loop is the
same for both.
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

from mamba_train.checkpoint import (CheckpointWriter, has_checkpoints, load_checkpoint, read_trainer_state,
                                    resolve_resume, save_checkpoint)
from mamba_train.config import RunConfig
from mamba_train.data import IndexedDataset, TrainLoader, build_train_samples, index_cache_dir, load_tokenizer
from mamba_train.eval import evaluate, format_table
from mamba_train.model import Mamba2LM, param_groups, set_recompute, training_flops_per_token
from mamba_train.train.cuda_graph import GraphedMicroStep
from mamba_train.train.metrics import MetricsLogger, SilentMetrics, peak_flops
from mamba_train.train.preemption import StopRequest
from mamba_train.train.profile import StepProfiler
from mamba_train.train.rng import rng_state, set_rng_state
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
    # one row per save: {"checkpoint", "blocking_s" (training stalled), "write_s" (files written)}
    saves: list[dict] = field(default_factory=list)


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
        if not Path(cfg.data.tokenizer).exists():  # most often: the data is not prepared yet
            raise TrainingError(f"data.tokenizer {cfg.data.tokenizer} does not exist: prepare the data first "
                                "(mamba-train prep RECIPE; data_prep/ has the recipes, pile.yaml for the shipped "
                                "configs), or point data.* at prepared data")
        cfg.model.vocab_size = load_tokenizer(cfg.data.tokenizer).vocab_size


def is_parallel(cfg: RunConfig) -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.parallel.tp > 1 or cfg.parallel.cp > 1


def train(cfg: RunConfig, resume: str | None = None, stop_after_steps: int | None = None) -> TrainResult:
    """Train until `train.steps` (or `stop_after_steps` more steps, as a preempted job
    would: checkpoint and return). `resume`: None, "auto" or a checkpoint directory."""
    resolve_vocab(cfg)
    device = pick_device(cfg)
    if cfg.train.cuda_graph and device.type != "cuda":
        raise TrainingError(f"train.cuda_graph replays CUDA graphs, and this run is on {device}: turn it off or "
                            "run on a GPU")
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    if is_parallel(cfg):
        from mamba_train.train.parallel_trainer import ParallelTrainer

        trainer = ParallelTrainer(cfg, device)  # checks the layout, then joins the process group
    else:
        trainer = SingleProcessTrainer(cfg, device)
    try:
        return _train(cfg, trainer, resume, stop_after_steps)
    finally:
        trainer.close()


def _train(cfg: RunConfig, trainer, resume: str | None, stop_after_steps: int | None) -> TrainResult:
    checkpoint = trainer.resolve_resume(resume)
    saved = read_trainer_state(checkpoint) if checkpoint is not None else None
    if saved is not None:
        _check_same_model(cfg, saved["config"], checkpoint)
    elif resume is None and has_checkpoints(cfg.checkpoint.dir):
        raise TrainingError(f"{cfg.checkpoint.dir} already holds checkpoints of another run: pass --resume auto to "
                            f"continue it, or set checkpoint.dir (and logging.run_dir) to a new directory")
    elif resume == "auto":
        trainer.log(f"--resume auto: no checkpoint in {cfg.checkpoint.dir} yet; starting at step 0")
    # before any work, on every rank (each may see another filesystem): a directory that cannot
    # be written fails now, not at the first save
    for setting, directory in (("checkpoint.dir", cfg.checkpoint.dir), ("logging.run_dir", cfg.logging.run_dir)):
        _make_writable_dir(setting, Path(directory))
    # a resumed run keeps the vocabulary padding (a multiple of 128·tp) it started with
    trainer.build(vocab_tp=saved.get("vocab_tp", 1) if saved is not None else None)

    # the training set, or a weighted blend of several (data.blend): the samples this run reads
    global_batch = cfg.train.micro_batch * cfg.train.grad_accum * trainer.dp_size   # sequences a step
    run_samples = cfg.train.steps * global_batch
    samples = build_train_samples(cfg.data, run_samples)
    samples.check_vocab(trainer.vocab_size)
    # the validation set is first read by the first evaluation, maybe hours in: check it now
    IndexedDataset(cfg.data.valid_prefix).check_vocab(trainer.vocab_size)

    run_dir = Path(cfg.logging.run_dir)
    step, consumed_samples, skipped = 0, 0, 0
    if checkpoint is not None:
        state = trainer.load(checkpoint)
        step, consumed_samples, skipped = state["step"], state["consumed_samples"], state.get("skipped_steps", 0)
        trainer.log(f"resumed from {checkpoint} at step {step} ({consumed_samples} samples consumed)")
        for line in _sampling_changes(cfg, saved, checkpoint, global_batch):
            trainer.log(line)
    if trainer.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # every DP rank reads its micro_batch rows of each global micro-batch of micro_batch · dp
    loader = TrainLoader(samples, cfg.train.micro_batch, seed=cfg.data.seed, consumed_samples=consumed_samples,
                         rank=trainer.dp_rank, world=trainer.dp_size, cache_dir=index_cache_dir(cfg.data))
    tokens_per_step = global_batch * cfg.data.seq_len
    flops_per_step = training_flops_per_token(cfg.model, trainer.vocab_size) * tokens_per_step
    peak = peak_flops(trainer.device, cfg.logging.peak_flops)
    metrics = MetricsLogger(cfg.logging, total_steps=cfg.train.steps, start_step=step) if trainer.is_main \
        else SilentMetrics()
    metrics.info(f"model: {trainer.num_parameters:,} parameters | {trainer.describe()} | "
                 f"{tokens_per_step:,} tokens/step | {samples.num_samples:,} training samples of {cfg.data.seq_len}")
    result = TrainResult(step=step)
    writer = CheckpointWriter(background=cfg.checkpoint.async_save, log=metrics.info)
    result.saves = writer.records

    def save() -> Path:
        trainer_state = {"step": step, "consumed_samples": loader.consumed_samples, "skipped_steps": skipped,
                         "config": cfg.to_dict()}
        started = time.perf_counter()
        path = trainer.save(trainer_state, writer)
        record = writer.records[-1]
        record["blocking_s"] = time.perf_counter() - started
        if writer.background:  # the write's own line comes from the writer when it is done
            record.update(writer.last_snapshot or {})
            metrics.info(f"checkpoint {path.name}: training stalled {record['blocking_s']:.2f} s "
                         f"({record.get('wait_s', 0.0):.2f} s for the previous save's write, "
                         f"{record.get('copy_s', 0.0):.2f} s copying to CPU); writing in the background")
        else:
            metrics.info(f"checkpoint {path.name}: saved in {record['blocking_s']:.2f} s")
        return path

    stop = StopRequest()
    last_step = cfg.train.steps if stop_after_steps is None else min(cfg.train.steps, step + stop_after_steps)
    profiler = StepProfiler(cfg.logging.profile_steps, step, last_step, run_dir, trainer.rank, trainer.device,
                            metrics.info)
    try:
        while step < last_step:
            started = time.perf_counter()
            lr = lr_at(step, cfg.optim, cfg.train.steps)
            loss_value, grad_norm = trainer.train_step(loader, lr)
            if grad_norm is None:
                # A non-finite loss or gradient: drop this step's update (its batches are consumed
                # and not retried) and go on, a bounded number of times.
                skipped += 1
                metrics.info(f"step {step + 1}: non-finite loss or gradient ({loss_value}); update skipped "
                             f"({skipped} of at most {cfg.train.max_skipped_steps})")
                if skipped > cfg.train.max_skipped_steps:
                    raise TrainingError(f"{skipped} steps with a non-finite loss or gradient (train.max_skipped_steps "
                                        f"= {cfg.train.max_skipped_steps}); stopping at step {step}: "
                                        f"{_kept(result.checkpoint or checkpoint)}. Lower optim.lr or check the "
                                        "data (and the model's settings, if it happens from the first steps).")
                continue
            step += 1
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            elapsed = time.perf_counter() - started
            row = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / elapsed}
            if peak:  # per accelerator: the step's FLOPs are spread over every rank
                row["mfu"] = flops_per_step / elapsed / (peak * trainer.world_size)
            if trainer.device.type == "cuda":
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
            result.losses[step] = loss_value
            metrics.log_step(step, row)
            if stop.requested():
                result.checkpoint, result.step, result.stopped_by = save(), step, stop.name
                trainer.wait_for_saves(writer)
                metrics.info(f"{stop.name}: checkpoint saved at step {step}; exiting (continue with --resume auto)")
                return result
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < last_step:
                result.checkpoint = save()
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                metrics.log_eval(step, trainer.evaluate(cfg.train.eval_batches))
            profiler.step()   # a profiled step includes its own save and evaluation, if it has them
        profiler.close()      # before the final save and evaluation
        result.checkpoint = save()
        trainer.wait_for_saves(writer)  # the checkpoint is complete (and its error raised) before going on
        if step < cfg.train.steps:
            metrics.info(f"stopped at step {step} of {cfg.train.steps}; continue with --resume auto")
            result.step = step
            return result
        result.eval = trainer.evaluate(max_batches=None)
        metrics.log_eval(step, result.eval)
        if trainer.is_main:
            (run_dir / "eval.json").write_text(json.dumps(result.eval, indent=1))
        if "subsets" in result.eval:  # the per-document evaluation (one process)
            metrics.info(format_table(result.eval))
    except KeyboardInterrupt:   # the finally below completes a background save
        metrics.info(f"Ctrl-C at step {step}: {_kept(result.checkpoint or checkpoint)}; continue with --resume "
                     "auto (to stop with a checkpoint of the current step, send SIGTERM instead)")
        raise
    finally:
        profiler.close()
        stop.close()
        try:
            # A background save still in flight (the run failed): let it finish, so the last
            # checkpoint is complete; its own error, if any, is raised here (with the run's as context).
            writer.wait()
        finally:
            metrics.close()
    result.step = step
    return result


class SingleProcessTrainer:
    """One process on CPU or one GPU: Mamba2LM, torch AdamW, bf16 autocast on GPU, and
    one-process checkpoints (model.safetensors + optimizer.pt; checkpoint/store.py)."""

    is_main, rank, dp_rank, dp_size, world_size = True, 0, 0, 1, 1

    def __init__(self, cfg: RunConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.amp_dtype = autocast_dtype(cfg, device)
        # a CUDA graph must not carry autocast's cached weight casts across its capture
        self.amp = ((lambda: torch.autocast(device.type, dtype=self.amp_dtype, cache_enabled=not cfg.train.cuda_graph))
                    if self.amp_dtype else nullcontext)
        self.graphed = None   # the captured micro-step (train.cuda_graph), made on the first batch

    def log(self, message: str) -> None:
        print(message, flush=True)

    def describe(self) -> str:
        return f"device {self.device}"

    def resolve_resume(self, resume: str | None) -> Path | None:
        return resolve_resume(self.cfg.checkpoint.dir, resume)

    def build(self, vocab_tp: int | None) -> None:
        cfg = self.cfg
        self.vocab_tp = vocab_tp or 1
        self.model = Mamba2LM(cfg.model, tp_size=self.vocab_tp).to(self.device)
        set_recompute(self.model, cfg.train.recompute)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                           betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                                           fused=self.device.type == "cuda")
        self.vocab_size = self.model.vocab_size
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        self.model.train()

    def load(self, checkpoint: Path) -> dict:
        # resolve_resume verified it; a parallel run's sharded checkpoint is merged here
        state = load_checkpoint(checkpoint, self.model, self.optimizer, map_location=self.device, verify=False)
        rng = state["rng"]
        set_rng_state(rng[0] if isinstance(rng, list) else rng)  # a parallel run's: one per rank
        return state

    def save(self, trainer_state: dict, writer: CheckpointWriter) -> Path:
        ckpt = self.cfg.checkpoint
        state = dict(trainer_state, rng=rng_state(), vocab_tp=self.vocab_tp)
        return save_checkpoint(ckpt.dir, trainer_state["step"], self.model, self.optimizer, state, ckpt.keep_last,
                               ckpt.keep_every, writer=writer)

    def wait_for_saves(self, writer: CheckpointWriter) -> None:
        writer.wait()

    def train_step(self, loader, lr: float) -> tuple[float, float | None]:
        """Forward/backward over `grad_accum` micro-batches, clip, update. Returns the mean
        loss and the gradient norm, or None for the norm when the step was not applied
        because the loss or the gradient is not finite."""
        model, optimizer, accum = self.model, self.optimizer, self.cfg.train.grad_accum
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the losses stay on the device until the step's one host sync (with the gradient
        # norm's), so that the CPU enqueues the next micro-batch while the GPU runs this one
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        for micro in range(accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(loader).items()}
            if not self.cfg.train.cuda_graph:
                loss_sum += self._forward_backward(batch)
                continue
            if self.graphed is None:
                self.graphed = GraphedMicroStep(self._forward_backward, model, batch, accumulation=accum > 1)
            loss_sum += self.graphed(batch, accumulate=micro > 0)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        params = [p for p in model.parameters() if p.grad is not None]
        total_norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # on the device
        loss_sum, grad_norm = torch.stack([loss_sum, total_norm.to(loss_sum)]).tolist()
        loss_value = loss_sum / accum
        applied = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if applied:  # else no clip and no step: the loop counts the step as skipped
            clipped_step(optimizer, params, total_norm, clip)
        if self.graphed is None:   # a captured step's first micro-batch overwrites its gradients, in place
            optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm if applied else None

    def _forward_backward(self, batch: dict) -> torch.Tensor:
        with self.amp():
            loss = self.model.loss(batch["input_ids"], batch["labels"], seq_idx=batch["seq_idx"])
        (loss / self.cfg.train.grad_accum).backward()
        return loss.detach()

    def evaluate(self, max_batches: int | None) -> dict:
        cfg = self.cfg
        valid = IndexedDataset(cfg.data.valid_prefix)
        max_tokens = None if max_batches is None else max_batches * cfg.train.micro_batch * cfg.data.seq_len
        return evaluate(self.model, valid, window=cfg.data.seq_len, max_tokens=max_tokens, device=self.device,
                        autocast_dtype=self.amp_dtype)

    def close(self) -> None:
        pass


def clipped_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], total_norm: torch.Tensor,
                 max_norm: float) -> None:
    """`optimizer.step()` on the gradients of `params` clipped as clip_grad_norm_ clips them:
    scaled by min(1, max_norm / (total_norm + 1e-6)), `total_norm` their norm (a device tensor).

    clip_grad_norm_ scales the gradients in a pass of its own: a read and a write of every fp32
    gradient, 4.0 ms a step at 1.3B parameters on an H100. A fused Adam(W) divides each gradient
    by `optimizer.grad_scale` as it reads it (the hook torch.amp.GradScaler unscales through), so
    there the clip rides in the optimizer's own pass. Its kernels (CPU and CUDA) then write the
    divided gradient back, as GradScaler's callers expect (2.0 ms more for the step), so this
    saves the pass's read, not its write: clip + step 20.1 → 18.1 ms at 1.3B on an H100.
    Other optimizers clip in place first. `params` must be every parameter of the optimizer
    that has a gradient: the fused kernel scales them all.
    """
    if not optimizer.defaults.get("fused"):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)  # clip_grad_norm_'s second half
        optimizer.step()
        return
    if math.isinf(max_norm):   # clipping off: no scale, and no write-back of every gradient
        optimizer.step()
        return
    coefficient = (max_norm / (total_norm.float() + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s, exactly
    # The kernel computes grad / (1 / coefficient) where clip_grad_norm_ computes grad * coefficient:
    # each rounds once from a slightly different value, so a clipped gradient may differ in its
    # last bit (identical when nothing is clipped: the scale is then exactly 1). Inverting
    # clip_grad_norm_'s own coefficient, rather than computing (total_norm + 1e-6) / max_norm,
    # keeps the 1e-6 where it is and makes such last-bit differences rarer.
    optimizer.grad_scale = 1 / coefficient
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale  # a later step must not divide again


def _kept(last_checkpoint: Path | None) -> str:
    return f"the last checkpoint, {last_checkpoint}, is kept" if last_checkpoint else "no checkpoint was saved yet"


def _make_writable_dir(setting: str, directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise TrainingError(f"{setting} {directory}: exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a parent that is a file, no permission
        raise TrainingError(f"{setting} {directory}: cannot create the directory ({err.strerror})") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise TrainingError(f"{setting} {directory}: the directory is not writable")


def _sampling_changes(cfg: RunConfig, saved: dict, checkpoint: Path, global_batch: int) -> list[str]:
    """Log lines for what differs from the run that wrote `checkpoint` (trainer state `saved`)
    in how samples are read. A resume goes on from its count of consumed samples, which a
    change of data settings points into another sample order (a mistake, unless only the data's
    path moved), as does a blend's run of another length; a change of global batch only cuts
    the same order into other steps."""
    lines = []
    now, then = cfg.to_dict()["data"], saved["config"].get("data", {})
    keys = ["seq_len", "seed", "blend" if now["blend"] or then.get("blend") else "train_prefix"]
    changed = "; ".join(f"data.{key} {then.get(key)!r} then, {now[key]!r} now" for key in keys if then.get(key) != now[key])
    if changed:
        lines.append(f"warning: {checkpoint} was trained on other data settings ({changed}): the samples it "
                     "consumed are counted against this run's sample order, so some samples may be read twice "
                     "or never (fine if only the path moved and the data is the same)")
    before = saved["config"]["train"]
    saved_batch = before["micro_batch"] * before["grad_accum"] * saved.get("layout", {}).get("dp", 1)
    if saved_batch != global_batch:
        lines.append(f"note: the global batch is now {global_batch} sequences, {saved_batch} when {checkpoint.name} "
                     "was written: the samples go on in the same order, in steps of the new size")
    then_samples, now_samples = before["steps"] * saved_batch, cfg.train.steps * global_batch
    if now["blend"] and not changed and then_samples != now_samples:
        # blend.build_blend_index spreads each dataset's samples over the run's whole length
        lines.append(f"warning: data.blend's sample order is drawn for the run's length (train.steps × global "
                     f"batch: {then_samples} samples then, {now_samples} now), so from here on this run reads "
                     "another order than the checkpoint's run did: some samples may be read twice or never")
    return lines


def _check_same_model(cfg: RunConfig, saved: dict, checkpoint: Path) -> None:
    current = cfg.to_dict()["model"]
    different = {k: (saved["model"].get(k), v) for k, v in current.items() if saved["model"].get(k) != v}
    if different:
        details = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in different.items())
        raise TrainingError(f"{checkpoint} was written by another model: {details}")
