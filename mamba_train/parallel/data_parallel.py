"""Data parallelism: DeepSpeed ZeRO-1/2 over megatron's groups (DESIGN §4), and a plain
gradient all-reduce with the same contract for runs without DeepSpeed.

Gradients are averaged over the DP × CP group: a CP rank holds a piece of the same
sequences, and its loss is the mean over its piece, so averaging over CP (equal pieces)
gives the gradient of the whole sequence's mean, and averaging over DP that of the
global batch. TP ranks hold distinct shards (or replicas with equal gradients) and are
never averaged.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from mamba_train.parallel.groups import ParallelDims


def allreduce_gradients(model: nn.Module, dims: ParallelDims) -> None:
    """Average every gradient over the DP × CP group, in one flat all-reduce (the
    DDP-equivalent path: what DeepSpeed's engine does for us when it is used)."""
    if dist.get_world_size(dims.dp_cp_group) == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=dims.dp_cp_group)
    flat /= dist.get_world_size(dims.dp_cp_group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def _is_tp_shard(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def clip_grad_norm(model: nn.Module, dims: ParallelDims, max_norm: float) -> float:
    """Clip by the norm of the whole (unsharded) model's gradient, as one process would:
    TP shards are summed over the TP group, replicas (norms) counted once. Call after
    `allreduce_gradients`, so every DP/CP rank holds the same gradients."""
    params = [p for p in model.parameters() if p.grad is not None]
    sharded = sum((p.grad.double().pow(2).sum() for p in params if _is_tp_shard(p)), torch.zeros((), dtype=torch.float64))
    replicated = sum((p.grad.double().pow(2).sum() for p in params if not _is_tp_shard(p)),
                     torch.zeros((), dtype=torch.float64))
    dist.all_reduce(sharded, group=dims.tp_group)
    total = math.sqrt((sharded + replicated).item())
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)  # torch.nn.utils.clip_grad_norm_'s epsilon
        for p in params:
            p.grad.mul_(scale)
    return total


class MegatronMPU:
    """The `mpu` DeepSpeed asks for, over megatron's groups: its "data parallel" group is
    DP × CP (where gradients are averaged), its "model parallel" group is TP (where
    gradient norms of shards are summed)."""

    def __init__(self, dims: ParallelDims):
        self.dims = dims

    def get_model_parallel_group(self):
        return self.dims.tp_group

    def get_model_parallel_rank(self):
        return self.dims.tp_rank

    def get_model_parallel_world_size(self):
        return self.dims.layout.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_data_parallel_group(self):
        return self.dims.dp_cp_group

    def get_data_parallel_rank(self):
        return dist.get_rank(self.dims.dp_cp_group)

    def get_data_parallel_world_size(self):
        return dist.get_world_size(self.dims.dp_cp_group)

    def get_pipeline_model_parallel_world_size(self):
        return 1


def deepspeed_config(micro_batch: int, grad_accum: int, zero_stage: int = 1, lr: float = 3e-4,
                     betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1, grad_clip: float = 1.0,
                     bf16: bool = False) -> dict:
    """ZeRO stage 1 (default) or 2; bf16 keeps fp32 master weights in the optimizer. The
    optimizer is torch's AdamW (DeepSpeed's `torch_adam`), so CPU runs need no built op."""
    if zero_stage not in (1, 2):
        raise ValueError(f"zero_stage: expected 1 or 2, found {zero_stage}")
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {"stage": zero_stage},
        # a step whose gradient norm is NaN/inf is skipped (DeepSpeed does so in fp32 always)
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "gradient_clipping": grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(betas), "eps": eps,
                                                  "weight_decay": weight_decay, "torch_adam": True,
                                                  "adam_w_mode": True}},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(model: nn.Module, dims: ParallelDims, config: dict, param_groups: list[dict] | None = None):
    """DeepSpeed engine over `model` with megatron's groups as `mpu`. global batch =
    micro_batch × grad_accum × dp (DeepSpeed checks it against its DP × CP world: a CP
    group shares samples, so its "batch" is counted cp times; we pass the sizes
    explicitly per rank and let train_batch_size follow)."""
    import deepspeed

    config = dict(config, train_batch_size=config["train_micro_batch_size_per_gpu"]
                  * config["gradient_accumulation_steps"] * dist.get_world_size(dims.dp_cp_group))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups or list(model.parameters()),
                                           config=config, mpu=MegatronMPU(dims), dist_init_required=False)
    _fuse_gradient_checks(engine.optimizer)
    return engine


def _fuse_gradient_checks(optimizer) -> None:
    """DeepSpeed's ZeRO-1/2 step examines the gradients one tensor at a time, in kernels
    launched while the GPU waits (a profile: docs/design-notes.md). With 434 gradient tensors on
    a 1.3b TP=2 rank:
    - its overflow check runs amax, amin and two isfinite (four kernels each) per tensor: over
      5,000 launches a step. Asked of all tensors at once instead: the norm of every gradient
      (torch's multi-tensor kernel), finite exactly when the gradient is, as torch's
      clip_grad_norm_(error_if_nonfinite=True) decides (a finite gradient whose norm
      overflows fp32, above ~1e19, counts as an overflow too);
    - its L2 norm copies each gradient to fp64 and takes its norm there. Instead the same
      multi-tensor norms (fp32 accumulation), with DeepSpeed's choice of which tensors count:
      no alignment padding, no pipeline replicas, and replicas across TP counted on TP rank 0.
    The reductions across the groups and the host reads around both stay DeepSpeed's."""
    from deepspeed import comm
    from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace

    if not hasattr(optimizer, "has_overflow_partitioned_grads_serial") or getattr(optimizer, "cpu_offload", False):
        return

    def has_overflow_partitioned_grads_serial():
        grads = [grad for i in range(len(optimizer.bit16_groups)) for grad in optimizer.averaged_gradients.get(i) or ()
                 if grad is not None]
        if not grads:
            return torch.zeros(1, dtype=torch.bool)
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        return torch.isfinite(torch.stack(norms)).all().logical_not().reshape(1)

    per_tensor_norm = optimizer.get_grad_norm_direct

    def get_grad_norm_direct(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return per_tensor_norm(gradients, params, norm_type)
        unpadded = (grad for grad in gradients if not getattr(grad, "_zero_padding", False))
        counted = [grad for grad, param in zip(unpadded, params) if not getattr(param, "ds_pipe_replicated", False)
                   and (is_model_parallel_parameter(param) or optimizer.model_parallel_rank == 0)]
        if counted:
            total = torch.stack(torch._foreach_norm(counted, 2, dtype=torch.float32)).square().sum()
        else:
            total = torch.zeros((), dtype=torch.float32, device=optimizer.device)
        comm.all_reduce(total, op=comm.ReduceOp.SUM, group=optimizer.dp_process_group)
        optimizer._model_parallel_all_reduce(tensor=total, op=comm.ReduceOp.SUM)
        total = total.sqrt()
        mask_nan_or_inf_with_val_inplace(total, device=optimizer.device)  # DeepSpeed's -1 for "not finite"
        return total

    optimizer.has_overflow_partitioned_grads_serial = has_overflow_partitioned_grads_serial
    optimizer.get_grad_norm_direct = get_grad_norm_direct
