"""One rank of a parallel run (DESIGN §4, §6), behind the trainer interface of loop.py:
torch.distributed (nccl on GPU, gloo on CPU) → megatron-core groups → the TP/CP model
→ DeepSpeed ZeRO-1/2 → sharded checkpoints (checkpoint/sharded.py).

What differs from one process:
- each DP rank reads its rows of every global micro-batch and each CP rank feeds its
  piece of the sequence: global batch = micro_batch × grad_accum × dp;
- DeepSpeed averages gradients over DP × CP, clips by the whole model's norm and steps;
  under bf16 the weights are bf16 with fp32 masters in the optimizer (no autocast), and
  a step whose gradient norm is not finite is skipped by DeepSpeed itself;
- with train.cuda_graph, the model's loss and backward replay from a CUDA graph, the
  engine's hooks, reduction and step stay eager (`ParallelRun.graph_loss`);
- the logged loss is the global batch's mean (one all-reduce per step), logged by rank 0;
- validation is the token-mean loss over packed windows of the validation data (each DP
  rank its windows, each CP rank its piece), not the per-document evaluation of one
  process, which carries state across windows (`mamba-train eval --ckpt` gives that).
"""

from __future__ import annotations

import functools
import math
import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mamba_train.checkpoint import read_trainer_state, resolve_resume
from mamba_train.checkpoint import CheckpointWriter
from mamba_train.checkpoint.sharded import load_sharded_into_engine, save_sharded, verify_together, wait_together
from mamba_train.config import RunConfig
from mamba_train.data import IndexedDataset, PackedSamples
from mamba_train.model import Mamba2LM, set_recompute
from mamba_train.parallel import LayoutError, destroy_parallel, setup_parallel, validate_layout
from mamba_train.train.loop import TrainingError, autocast_dtype
from mamba_train.train.rng import rng_state, set_rng_state


def _explain_collective_errors(method):
    """A collective that timed out, or whose peer died, says so in the terms of the config."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except RuntimeError as err:
            message = str(err)
            if "timed out" in message.lower() or "timeout" in message.lower():
                raise TrainingError(f"rank {self.rank}: a collective did not complete within parallel.timeout_minutes"
                                    f"={self.cfg.parallel.timeout_minutes}: another rank has failed or hangs "
                                    f"({message.strip().splitlines()[0]})") from err
            if "closed by peer" in message or "Connection reset" in message:
                raise TrainingError(f"rank {self.rank}: another rank has exited "
                                    f"({message.strip().splitlines()[0]})") from err
            raise

    return wrapper


def _sequence_parallel_note(layout) -> str:
    if not layout.sequence_parallel:
        return ""
    return " (sequence parallel, comm overlap)" if layout.tp_comm_overlap else " (sequence parallel)"


class ParallelTrainer:
    def __init__(self, cfg: RunConfig, device: torch.device):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        parallel = cfg.parallel
        try:  # before any process group or model: a layout that cannot work costs nothing
            self.layout = validate_layout(cfg.model, cfg.data.seq_len, world, tp=parallel.tp, cp=parallel.cp,
                                          sequence_parallel=parallel.sequence_parallel,
                                          tp_comm_overlap=parallel.tp_comm_overlap,
                                          cp_symmetric_memory=parallel.cp_symmetric_memory)
        except LayoutError as err:
            raise TrainingError(f"parallel layout: {err}") from err
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if self.layout.tp_comm_overlap and device.type == "cuda" and parallel.tp > per_node:
            # megatron's TP groups are consecutive ranks; symmetric memory maps the group's GPUs
            # into each other's address space, which needs them on one node
            raise TrainingError(f"parallel.tp_comm_overlap needs each TP group on one node: tp={parallel.tp} is more "
                                f"than the {per_node} processes a node runs (LOCAL_WORLD_SIZE)")
        self.cfg = cfg
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        else:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported
        self.device = device
        self.bf16 = autocast_dtype(cfg, device) == torch.bfloat16
        self.owns_process_group = not dist.is_initialized()  # torchrun: ours; the tests' helper: theirs
        if self.owns_process_group:
            missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "RANK") if name not in os.environ]
            if missing:
                raise TrainingError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the trainers with "
                                    f"torchrun (mamba-train launch torchrun --nproc-per-node N CONFIG …)")
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=timedelta(minutes=parallel.timeout_minutes))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.run = None

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def describe(self) -> str:
        layout = self.layout
        return (f"{self.world_size} ranks: tp {layout.tp} × cp {layout.cp} × dp {layout.dp}"
                f"{_sequence_parallel_note(layout)} | ZeRO-{self.cfg.parallel.zero_stage} "
                f"{'bf16' if self.bf16 else 'fp32'} | {dist.get_backend()} | device {self.device}")

    @_explain_collective_errors
    def resolve_resume(self, resume: str | None) -> Path | None:
        # every rank hashes its share of the files; all of them agree on the checkpoint
        return resolve_resume(self.cfg.checkpoint.dir, resume, log=self.log, verify=verify_together)

    @_explain_collective_errors
    def build(self, vocab_tp: int | None) -> None:
        cfg, parallel = self.cfg, self.cfg.parallel
        self.vocab_tp = vocab_tp or parallel.tp
        self.vocab_size = cfg.model.padded_vocab_size(self.vocab_tp)
        if self.vocab_size % parallel.tp:
            raise TrainingError(f"the checkpoint's vocabulary is padded to {self.vocab_size} rows (for tp="
                                f"{self.vocab_tp}), which parallel.tp={parallel.tp} does not divide")
        self.run = setup_parallel(cfg.model, cfg.data.seq_len, cfg.optim, cfg.train.micro_batch, cfg.train.grad_accum,
                                  tp=parallel.tp, cp=parallel.cp, sequence_parallel=parallel.sequence_parallel,
                                  tp_comm_overlap=parallel.tp_comm_overlap,
                                  cp_symmetric_memory=parallel.cp_symmetric_memory, zero_stage=parallel.zero_stage, bf16=self.bf16, seed=cfg.train.seed,
                                  device=self.device, vocab_tp=self.vocab_tp, timeout_minutes=parallel.timeout_minutes)
        self.engine, self.dims = self.run.engine, self.run.dims
        set_recompute(self.run.model, cfg.train.recompute)
        self.dp_rank, self.dp_size = self.dims.dp_rank, self.layout.dp
        with torch.device("meta"):  # the whole model's count, not this rank's shard
            self.num_parameters = sum(p.numel() for p in Mamba2LM(cfg.model, tp_size=self.vocab_tp).parameters())
        self.engine.train()

    @_explain_collective_errors
    def load(self, checkpoint: Path) -> dict:
        load_sharded_into_engine(checkpoint, self.engine, self.dims, self.cfg.model)
        state = read_trainer_state(checkpoint)
        rng = state["rng"]
        if isinstance(rng, list):  # every rank's; on another layout all take rank 0's
            rng = rng[self.rank] if len(rng) == self.world_size else rng[0]
        set_rng_state(rng)
        return state

    @_explain_collective_errors
    def save(self, trainer_state: dict, writer: CheckpointWriter) -> Path:
        ckpt = self.cfg.checkpoint
        return save_sharded(ckpt.dir, trainer_state["step"], self.engine, self.dims,
                            dict(trainer_state, vocab_tp=self.vocab_tp), rng_state(), ckpt.keep_last, ckpt.keep_every,
                            writer=writer, timeout_s=60 * self.cfg.parallel.timeout_minutes)

    @_explain_collective_errors
    def wait_for_saves(self, writer: CheckpointWriter) -> None:
        wait_together(writer)  # every rank raises if a background write failed on any

    @_explain_collective_errors
    def train_step(self, loader, lr: float) -> tuple[float, float | None]:
        """`grad_accum` micro-batches through the engine, which steps at the last. Returns the
        global batch's mean loss and the gradient norm, or None for the norm when DeepSpeed
        skipped the update because the gradient is not finite."""
        engine, accum = self.engine, self.cfg.train.grad_accum
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(accum):
            batch = self.run.piece({k: v.to(self.device, non_blocking=True) for k, v in next(loader).items()})
            if self.cfg.train.cuda_graph and self.run.graphed is None:   # captured on the first batch
                self.run.graph_loss(batch)
            loss = engine(batch["input_ids"], batch["seq_idx"], labels=batch["labels"])  # mean over this piece
            engine.backward(loss)  # scaled by 1 / grad_accum inside
            engine.step()  # the optimizer steps at the accumulation boundary only
            loss_sum += loss.detach().float()
        loss_value = self.run.average(loss_sum) / accum
        grad_norm = engine.get_global_grad_norm()
        grad_norm = math.nan if grad_norm is None else float(grad_norm)
        return loss_value, grad_norm if math.isfinite(grad_norm) else None

    @_explain_collective_errors
    @torch.no_grad()
    def evaluate(self, max_batches: int | None) -> dict:
        """Mean loss per token over the validation data's packed windows of seq_len (all of
        them, or the first max_batches · micro_batch · dp); every rank returns the result."""
        cfg, model = self.cfg, self.engine.module
        valid = PackedSamples(IndexedDataset(cfg.data.valid_prefix), cfg.data.seq_len)
        micro = cfg.train.micro_batch
        total = valid.num_samples if max_batches is None else min(valid.num_samples, max_batches * micro * self.dp_size)
        first, last = total * self.dp_rank // self.dp_size, total * (self.dp_rank + 1) // self.dp_size
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # summed loss, tokens
        model.eval()
        for start in range(first, last, micro):
            items = [valid[i] for i in range(start, min(last, start + micro))]
            tokens = torch.from_numpy(np.stack([t for t, _ in items]))       # (b, seq_len + 1)
            seq_idx = torch.from_numpy(np.stack([s for _, s in items]))      # (b, seq_len)
            batch = self.run.piece({"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "seq_idx": seq_idx})
            batch = {k: v.to(self.device) for k, v in batch.items()}
            loss = model.loss(batch["input_ids"], batch["labels"], batch["seq_idx"], reduction="sum")
            sums[0] += loss.double()
            sums[1] += batch["labels"].numel()
        model.train()
        dist.all_reduce(sums, group=self.dims.dp_cp_group)  # TP ranks hold the same sums
        loss = (sums[0] / sums[1].clamp(min=1)).item()
        return {"overall": {"tokens": int(sums[1].item()), "loss": loss, "ppl": math.exp(loss)},
                "windows": total, "window": cfg.data.seq_len, "ranks": self.world_size}

    def close(self) -> None:
        if self.run is not None:
            self.run.release_graph()   # a live graph of NCCL calls would hang the groups' destruction
            destroy_parallel()
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
