"""Triton helpers more than one stage's kernels share."""

import triton
import triton.language as tl


@triton.jit
def cb_tile(cb_ptr, rows, cols, stride_rows, stride_cols, chunk_size):
    # A tile of CB (or of CBᵀ) with the chunk's bounds alone in the load mask, so that it loads
    # as vectors. Callers apply the causal, document and chunk-length masks by select, never by
    # multiplying with zero: CB above the diagonal may be unwritten (bmm.py).
    return tl.load(cb_ptr + rows[:, None] * stride_rows + cols[None, :] * stride_cols,
                   mask=(rows[:, None] < chunk_size) & (cols[None, :] < chunk_size), other=0.0)


@triton.jit
def head_program_ids(HEADS_FASTEST: tl.constexpr):
    # (tile, batch × chunk, head) of a program of a per-head launcher, whose grid launch.head_grid
    # ordered: with HEADS_FASTEST the heads of one tile of a chunk are neighbouring programs,
    # which run at the same time and share that chunk's group tiles (CB, B, C) in L2
    if HEADS_FASTEST:
        pid_tile, pid_bc, pid_h = tl.program_id(1), tl.program_id(2), tl.program_id(0)
    else:
        pid_tile, pid_bc, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    return pid_tile, pid_bc, pid_h
