"""One call from a run config to a parallel training setup, for the training loop:
layout check → megatron groups → model (same seed on every rank) → shard → DeepSpeed.

    run = setup_parallel(cfg.model, seq_len, tp=..., cp=..., sequence_parallel=..., ...)
    loader = TrainLoader(samples, micro_batch, seed, consumed, rank=run.dims.dp_rank, world=run.dims.layout.dp)
    batch = run.piece(next(loader))                 # this CP rank's piece of this DP rank's rows
    loss = run.engine(batch["input_ids"], batch["seq_idx"], labels=batch["labels"])
    run.engine.backward(loss); run.engine.step()   # steps at the accumulation boundary
    logged = run.average(loss)                      # the global batch's mean loss, on every rank

With `run.graph_loss(batch)` (train.cuda_graph) the engine call replays the loss and its
backward from a CUDA graph from then on; the rest of the step is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mamba_train.config import ModelConfig, OptimConfig
from mamba_train.model import Mamba2LM, param_groups
from mamba_train.parallel.data_parallel import build_engine, deepspeed_config
from mamba_train.parallel.groups import ParallelDims, init_parallel, validate_layout
from mamba_train.parallel.lm import ParallelMamba2LM, context_parallel_piece, parallelize_model


@dataclass
class ParallelRun:
    dims: ParallelDims
    model: ParallelMamba2LM
    engine: object  # deepspeed.DeepSpeedEngine
    graphed: object = None  # the GraphedLoss the engine's calls replay (graph_loss), if any

    def piece(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"input_ids", "labels", "seq_idx"}: (micro, seq_len) → (micro, seq_len / cp)."""
        return {key: context_parallel_piece(value, self.dims) for key, value in batch.items()}

    def average(self, loss: torch.Tensor) -> float:
        """Mean of the per-piece losses over DP × CP: the global batch's loss, for logging."""
        total = loss.detach().float().clone()
        dist.all_reduce(total, group=self.dims.dp_cp_group)
        return total.item() / dist.get_world_size(self.dims.dp_cp_group)

    def graph_loss(self, example: dict[str, torch.Tensor], capture: bool = True) -> None:
        """From now on `engine(input_ids, seq_idx, labels=)` in training computes this rank's
        loss and gradients from one CUDA graph captured on `example` (a piece, as `piece`
        returns it; later batches must have its shapes), collectives included, and hands the
        gradients to the engine's backward (`GraphedLoss`): DeepSpeed's hooks, reduction and
        step stay eager. capture=False hands over without a graph (the CPU tests).

        The engine calls its module's forward; as torch.cuda.make_graphed_callables does, the
        model's forward becomes the replay (an instance attribute). Evaluation calls
        `model.loss` and stays eager."""
        from mamba_train.train.cuda_graph import GraphedLoss

        model = self.model
        if self.graphed is not None:
            raise RuntimeError("graph_loss: this run's loss is already replayed from a graph")
        graphed = GraphedLoss(model, lambda m, b: m.loss(b["input_ids"], b["labels"], b["seq_idx"]), example,
                              capture=capture, scale=1 / self.engine.gradient_accumulation_steps())
        eager = model.forward

        def forward(input_ids, seq_idx=None, labels=None):
            if labels is None or not model.training:
                return eager(input_ids, seq_idx, labels)
            return graphed({"input_ids": input_ids, "labels": labels, "seq_idx": seq_idx})

        model.forward = forward
        self.graphed = graphed

    def release_graph(self) -> None:
        """Back to eager steps, the graph freed (before the process groups are destroyed)."""
        if self.graphed is not None:
            self.graphed.release()
            del self.model.forward   # the class's forward again
            self.graphed = None


def setup_parallel(model_cfg: ModelConfig, seq_len: int, optim: OptimConfig, micro_batch: int, grad_accum: int,
                   tp: int = 1, cp: int = 1, sequence_parallel: bool = False, tp_comm_overlap: bool = False,
                   cp_symmetric_memory: bool = True, zero_stage: int = 1,
                   bf16: bool = False, seed: int = 1234, device: torch.device | None = None,
                   vocab_tp: int | None = None, timeout_minutes: float | None = None) -> ParallelRun:
    """`vocab_tp`: pad the vocabulary as for this TP size (default: tp); a run resumed on
    another TP size keeps the padding its checkpoint was trained with. `timeout_minutes`:
    how long a collective of the TP/CP/DP groups may wait before it raises."""
    layout = validate_layout(model_cfg, seq_len, dist.get_world_size(), tp=tp, cp=cp,
                             sequence_parallel=sequence_parallel, tp_comm_overlap=tp_comm_overlap,
                             cp_symmetric_memory=cp_symmetric_memory)
    dims = init_parallel(layout, timeout_minutes)
    # The same full model on every rank (one seed), then sliced: a TP run starts from exactly
    # the weights a TP=1 run would, and a TP=1 checkpoint shards with shard_state_dict.
    torch.manual_seed(seed)
    model = parallelize_model(Mamba2LM(model_cfg, tp_size=vocab_tp or tp), dims)
    if device is not None:
        model = model.to(device)
    config = deepspeed_config(micro_batch, grad_accum, zero_stage, lr=optim.lr, betas=(optim.beta1, optim.beta2),
                              eps=optim.eps, weight_decay=optim.weight_decay, grad_clip=optim.grad_clip, bf16=bf16)
    engine = build_engine(model, dims, config, param_groups(model, optim.weight_decay))
    return ParallelRun(dims=dims, model=model, engine=engine)
