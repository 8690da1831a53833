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


@triton.jit
def state_tile(pid_pn, hdim, dstate, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    # the p and n offsets of the (p block, n block) tile of a state that program index pid_pn
    # (over p blocks × n blocks, n fastest) owns, and the tile's bounds mask
    num_n = tl.cdiv(dstate, BLOCK_N)
    offs_p = (pid_pn // num_n) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_p, offs_n, (offs_p[:, None] < hdim) & (offs_n[None, :] < dstate)
