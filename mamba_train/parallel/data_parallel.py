"""Data parallelism: DeepSpeed ZeRO-1/2 over megatron's groups (DESIGN §4), and, for runs
without DeepSpeed, the same gradient average either as one flat all-reduce after the backward
(`allreduce_gradients`) or bucketed and overlapped with the backward (`GradientBuckets`).

Gradients are averaged over the DP × CP group: a CP rank holds a piece of the same
sequences, and its loss is the mean over its piece, so averaging over CP (equal pieces)
gives the gradient of the whole sequence's mean, and averaging over DP that of the
global batch. TP ranks hold distinct shards (or replicas with equal gradients) and are
never averaged.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from dataclasses import dataclass, field

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


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    buffer: torch.Tensor            # flat, one dtype: every parameter's .grad is a view of it
    views: list[torch.Tensor]       # params[i].grad, as attached
    ready: set[int] = field(default_factory=set)   # slots accumulated in this syncing backward
    launched: bool = False


def _grad_ready(owner: weakref.ref, index: int, slot: int, param: nn.Parameter) -> None:
    # a weak reference: the hooks live on the parameters, which the buckets hold
    buckets = owner()
    if buckets is not None:
        buckets._ready(index, slot, param)


class GradientBuckets:
    """Average gradients over `group` as DDP does, overlapped with the backward, instead of
    `allreduce_gradients`' flat all-reduce after it (a profile of a CP=2 step: ~30 ms of 165
    in the cat, the all-reduce, the divide and the copy back, none of it overlapped).

    The parameters that require grad, in reverse registration order (the order in which the
    backward produces their gradients), are grouped into buckets of at most `bucket_mb` MiB of
    one dtype (a larger parameter gets a bucket alone). Each bucket owns one flat buffer and
    every parameter's `.grad` is a view of it, so the backward's AccumulateGrad accumulates in
    place into the buffer: nothing to cat or copy back. A post-accumulate-grad hook per
    parameter launches a bucket's all-reduce as soon as all of its parameters have their
    gradient; on CUDA it runs on a side stream (NCCL's AVG), while the backward goes on. Buckets
    launch in order, so every rank issues the same collectives in the same order even where
    their backwards reach the parameters differently. At the end of the backward (an autograd
    engine callback, queued by the first hook) the buckets not yet launched go too (parameters
    without gradient this time: zeros, so no rank waits for ever) and the caller's stream waits
    for the side stream. No host synchronisation: a CUDA graph may capture the backward, the
    all-reduces included (the side stream forks from and joins the capturing stream).

    `sync` (default True) says whether a backward reduces: with gradient accumulation, set it
    False (or use `no_sync()`) for all but the last micro-batch. `zero_grad()` replaces
    `model.zero_grad()`, which would set the views to None: it fills each buffer with zeros and
    re-attaches a view that was replaced. A parameter without gradient holds zeros, not None.
    On CPU (gloo has no AVG) a bucket is summed, then divided, synchronously. With a group of one
    rank nothing is bucketed or hooked: zero_grad sets the gradients to None, as
    model.zero_grad does. Keep the object as long as the model trains (the hooks refer to it
    weakly, so dropping both frees them without a reference cycle). Assumed, not checked: one
    GradientBuckets per model (a second would add its hooks and reduce again), a bucket's
    gradients written on one stream, and every rank reaching at least one parameter in a
    syncing backward (as with DDP, a rank that reaches none leaves the others waiting)."""

    _ALIGN_BYTES = 64   # each view starts on a 64-byte boundary: vectorized kernels stay vectorized

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None, bucket_mb: float = 25):
        self.group = group
        self.world = dist.get_world_size(group)
        self.sync = True
        self.params = [p for p in model.parameters() if p.requires_grad][::-1]
        self.buckets: list[_Bucket] = []
        self._next = 0          # the next bucket to launch in this backward
        self._queued = False    # the end-of-backward callback is queued
        self._stream = None
        if self.world == 1:
            return
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"GradientBuckets: parameters on several devices {sorted(map(str, devices))}")
        self._device = devices.pop() if devices else torch.device("cpu")
        backend = str(dist.get_backend(group))
        self._avg = self._device.type == "cuda" and "nccl" in backend   # gloo has no AVG
        if self._device.type == "cuda":
            self._stream = torch.cuda.Stream(self._device)

        limit = bucket_mb * 2**20
        plans, filling = [], {}   # [params, offsets, numel] per bucket in opening order; dtype → plan filling
        for param in self.params:
            plan = filling.get(param.dtype)
            if plan is None or (plan[2] + param.numel()) * param.element_size() > limit:
                plan = filling[param.dtype] = [[], [], 0]   # (a larger parameter gets one alone)
                plans.append(plan)
            align = max(1, self._ALIGN_BYTES // param.element_size())
            plan[0].append(param)
            plan[1].append(plan[2])
            plan[2] = -(-(plan[2] + param.numel()) // align) * align
        owner = weakref.ref(self)
        for index, (params, offsets, numel) in enumerate(plans):
            buffer = torch.zeros(numel, dtype=params[0].dtype, device=self._device)
            if self._stream is not None:
                # the side stream uses the buffer too: should it be freed (the model dropped)
                # while an all-reduce is queued, its memory waits for that stream
                buffer.record_stream(self._stream)
            views = [buffer[offset:offset + p.numel()].view_as(p) for p, offset in zip(params, offsets)]
            for slot, (param, view) in enumerate(zip(params, views)):
                if param.grad is not None:
                    view.copy_(param.grad)
                param.grad = view
                param.register_post_accumulate_grad_hook(functools.partial(_grad_ready, owner, index, slot))
            self.buckets.append(_Bucket(params, buffer, views))

    @contextlib.contextmanager
    def no_sync(self):
        """Backwards inside accumulate without reducing (DDP's no_sync)."""
        sync, self.sync = self.sync, False
        try:
            yield
        finally:
            self.sync = sync

    def zero_grad(self) -> None:
        """Zero every gradient in place, one fill per bucket (capturable), re-attaching the
        views that something set to None or replaced."""
        if self.world == 1:
            for param in self.params:
                param.grad = None
            return
        self._reset()   # a backward that raised never ran its callback
        for bucket in self.buckets:
            bucket.buffer.zero_()
            for param, view in zip(bucket.params, bucket.views):
                if param.grad is not view:
                    param.grad = view

    def _ready(self, index: int, slot: int, param: nn.Parameter) -> None:
        # post-accumulate-grad hook: param.grad holds this backward's gradient
        if not self.sync:
            return
        bucket = self.buckets[index]
        if bucket.launched:
            raise RuntimeError("GradientBuckets: a gradient accumulated after its bucket's all-reduce (a "
                               "parameter reached twice in one backward, as reentrant checkpointing does)")
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        view = bucket.views[slot]
        if param.grad is not view:   # something replaced it: the bucket must hold the gradient
            view.copy_(param.grad)
            param.grad = view
        bucket.ready.add(slot)
        # in bucket order, so that every rank issues the same all-reduces in the same order
        while self._next < len(self.buckets) and self._complete(self.buckets[self._next]):
            self._launch(self.buckets[self._next])

    @staticmethod
    def _complete(bucket: _Bucket) -> bool:
        return len(bucket.ready) == len(bucket.params)

    def _launch(self, bucket: _Bucket) -> None:
        bucket.launched = True
        self._next += 1
        if self._stream is None:
            dist.all_reduce(bucket.buffer, group=self.group)
            bucket.buffer.div_(self.world)
            return
        # The side stream starts after the gradients written so far on the backward's stream.
        # NCCL runs on its own stream; a synchronous all_reduce makes the *current* stream wait
        # for it (no host wait): the side stream here, so the backward goes on.
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            if self._avg:
                dist.all_reduce(bucket.buffer, op=dist.ReduceOp.AVG, group=self.group)
            else:
                dist.all_reduce(bucket.buffer, group=self.group)
                bucket.buffer.div_(self.world)

    def _finish(self) -> None:
        # end of a syncing backward, on the caller's streams: the buckets still waiting had a
        # parameter without gradient; launch them (in order, as every rank does) and join
        for bucket in self.buckets[self._next:]:
            for slot, (param, view) in enumerate(zip(bucket.params, bucket.views)):
                if slot not in bucket.ready and param.grad is not view:   # detached since zero_grad
                    if param.grad is None:
                        view.zero_()
                    else:
                        view.copy_(param.grad)
                    param.grad = view
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
        if self._stream is not None:
            torch.cuda.current_stream(self._device).wait_stream(self._stream)
        self._reset()

    def _reset(self) -> None:
        self._next, self._queued = 0, False
        for bucket in self.buckets:
            bucket.ready.clear()
            bucket.launched = False


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
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce when it starts (25 s in
        # a fresh environment, with build lines from every rank), which only its
        # inference_all_reduce uses; DeepSpeed keeps this dict for edits such as this one
        deepspeed.ops.__compatible_ops__[accelerator.get_op_builder("ShareMemCommBuilder").NAME] = False
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
