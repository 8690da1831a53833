"""Parallelism (DESIGN §4): megatron-core process groups (TP × CP × DP, PP = 1), tensor
parallel Mamba-2 blocks, context parallelism by state passing, data parallel engines.

Order of use: validate_layout → init_parallel → parallelize_model → build_engine (or
allreduce_gradients) → train on `context_parallel_piece` of each DP rank's batch;
`setup_parallel` does all of it for the training loop.
"""

from mamba_train.parallel.groups import (LayoutError, ParallelDims, ParallelLayout, destroy_parallel, init_parallel,
                                         validate_layout)
from mamba_train.parallel.lm import ParallelMamba2LM, context_parallel_piece, parallelize_model
from mamba_train.parallel.setup import ParallelRun, setup_parallel
from mamba_train.parallel.tensor_parallel import merge_state_dicts, shard_state_dict

__all__ = ["LayoutError", "ParallelDims", "ParallelLayout", "ParallelMamba2LM", "ParallelRun", "context_parallel_piece",
           "destroy_parallel", "init_parallel", "merge_state_dicts", "parallelize_model", "setup_parallel",
           "shard_state_dict", "validate_layout"]
