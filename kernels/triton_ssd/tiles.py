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
