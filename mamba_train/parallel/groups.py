"""Process groups (TP × CP × DP, PP = 1) from megatron-core's parallel_state, and the
layout check that runs before any of them is built.

Rank order is megatron's default "tp-cp-ep-dp-pp": tensor-parallel ranks are adjacent
(on a GPU host they share NVLink), then context parallel, then data parallel.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mamba_train.config import ModelConfig


class LayoutError(ValueError):
    """A TP × CP × DP layout that cannot run this model; raised before any work."""


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    # SP split by batch rows on CUDA: in_proj's gather and out_proj's scatter run inside their
    # matmuls over symmetric memory (parallel/sequence_parallel.py)
    tp_comm_overlap: bool = False
    # CP on CUDA: the boundary states relayed rank to rank over symmetric memory (context_parallel.py)
    cp_symmetric_memory: bool = True

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp


def validate_layout(model: ModelConfig, seq_len: int, world_size: int, tp: int = 1, cp: int = 1,
                    sequence_parallel: bool = False, tp_comm_overlap: bool = False,
                    cp_symmetric_memory: bool = True) -> ParallelLayout:
    """The layout for `world_size` ranks, or a LayoutError naming what does not divide."""
    for name, value in (("parallel.tp", tp), ("parallel.cp", cp), ("world size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise LayoutError(f"{name}: expected an integer >= 1, found {value!r}")
    # Each TP rank owns whole heads and whole groups (DESIGN §4): a head never straddles ranks.
    if model.nheads % tp:
        raise LayoutError(f"parallel.tp={tp} must divide model nheads={model.nheads} "
                          f"(d_inner {model.d_inner} / headdim {model.headdim}): each rank owns whole heads")
    if model.ngroups % tp:
        raise LayoutError(f"parallel.tp={tp} must divide model.ngroups={model.ngroups}: each rank owns whole "
                          f"B/C groups (use ngroups a multiple of tp, or a smaller tp)")
    if seq_len % cp:
        raise LayoutError(f"parallel.cp={cp} must divide data.seq_len={seq_len}: each rank takes one contiguous "
                          f"piece of seq_len / cp tokens")
    local_len = seq_len // cp
    if cp > 1 and local_len < model.d_conv - 1:
        raise LayoutError(f"data.seq_len / parallel.cp = {local_len} is shorter than the conv halo "
                          f"(d_conv - 1 = {model.d_conv - 1}): the halo comes from the previous rank only")
    # SP splits a batch's rows over the TP ranks where they divide, else each row's tokens
    # (parallel/sequence_parallel.py). The micro-batch is not known here and evaluation's last
    # batch may be smaller, so every layout must allow the split by the sequence.
    if sequence_parallel and local_len % tp:
        raise LayoutError(f"sequence parallelism splits each row's {local_len} tokens (a rank's piece) over "
                          f"tp={tp} ranks for a batch whose rows tp does not divide: seq_len / cp must be a "
                          f"multiple of tp")
    if world_size % (tp * cp):
        raise LayoutError(f"world size {world_size} is not tp·cp·dp for tp={tp}, cp={cp}: "
                          f"it must be a multiple of tp·cp = {tp * cp}")
    if tp_comm_overlap and not sequence_parallel:
        raise LayoutError("parallel.tp_comm_overlap overlaps sequence parallelism's gather and scatter with "
                          "in_proj's and out_proj's matmuls: it needs parallel.sequence_parallel on")
    return ParallelLayout(tp=tp, cp=cp, dp=world_size // (tp * cp), sequence_parallel=sequence_parallel and tp > 1,
                          tp_comm_overlap=tp_comm_overlap and tp > 1, cp_symmetric_memory=cp_symmetric_memory)


@dataclass
class ParallelDims:
    """This rank's place in the layout and the groups it talks to (every collective
    passes one of these explicitly)."""

    layout: ParallelLayout
    tp_group: dist.ProcessGroup
    cp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    dp_cp_group: dist.ProcessGroup  # where gradients are averaged: every copy of the weights
    tp_rank: int
    cp_rank: int
    dp_rank: int


def init_parallel(layout: ParallelLayout, timeout_minutes: float | None = None) -> ParallelDims:
    """Build megatron's groups for `layout` on the default process group (already
    initialised by torchrun or the test helper). `timeout_minutes`: a collective in these
    groups that has not completed by then raises (megatron's default: 30)."""
    if not dist.is_initialized():
        raise RuntimeError("init_parallel: torch.distributed is not initialised (start with torchrun)")
    if dist.get_world_size() != layout.world_size:
        raise LayoutError(f"world size {dist.get_world_size()} != tp·cp·dp = {layout.tp}·{layout.cp}·{layout.dp}")
    if dist.get_backend() == "gloo" and not torch.cuda.is_available():
        enable_megatron_on_cpu()
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    timeout = {} if timeout_minutes is None else {"distributed_timeout_minutes": timeout_minutes}
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tp,
                                             context_parallel_size=layout.cp, **timeout)
    return ParallelDims(
        layout=layout,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        cp_group=parallel_state.get_context_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def model_parallel_config(layout: ParallelLayout, params_dtype: torch.dtype = torch.float32):
    """megatron-core's ModelParallelConfig for our linears. Weights are never initialised by
    megatron (perform_initialization=False): parallelize_model copies in the shards of the
    single-process model, so a TP run starts from exactly the TP=1 weights."""
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=layout.tp, context_parallel_size=layout.cp,
        sequence_parallel=layout.sequence_parallel, params_dtype=params_dtype,
        use_cpu_initialization=True, perform_initialization=False,
        gradient_accumulation_fusion=False)


_CPU_PATCHED = False


def enable_megatron_on_cpu() -> None:
    """megatron-core allocates its sequence-parallel gather buffers and a few outputs on
    `torch.cuda.current_device()`, which raises on a CPU-only torch. On such a build nothing
    can use CUDA anyway, so point that call at the CPU: the gloo tests then run megatron's
    own layers unchanged. A no-op where CUDA exists."""
    global _CPU_PATCHED
    if _CPU_PATCHED or torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: "cpu"
    # megatron asks for this to order CUDA streams; there are none here
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    _CPU_PATCHED = True
