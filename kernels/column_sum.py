"""The sum of many fp32 partial rows into one row, in one pass: the last step of the backward
kernels whose programs each leave a partial sum of a weight's gradient (the gated norm's and
the conv's dweight, the conv's dbias).

torch's `partials.sum(0)` over (m, d) partials, m in the hundreds and d a few thousand, is slow
for the bytes it reads, and a cast to the weight's dtype or layout is a second kernel. Here a
program takes a band of columns and walks the rows a tile at a time, and writes the sum once,
in the output's dtype and strides. H100, ms, CUDA-graph medians, torch's sum and cast → this
(`bench/bench_split_sum.py`, at a CP=2 rank's shapes of 1.3b): the gated norm's dweight (256 ×
4096 → bf16) 0.0065 → 0.0028, the block norm's (512 × 2048) 0.0094 → 0.0039, the conv's dweight
(32 × 4 × 4608 → its (4608, 4) layout) 0.0060 → 0.0030, its dbias 0.0048 → 0.0018. Inside the
CP step (`bench_parallel --profile`) torch's reductions after the norm had averaged 14 µs.
"""

import torch
import triton
import triton.language as tl

from . import triton_interpreter  # noqa: F401  (a loop to a run-time bound)
from .cached_launch import cached_launch
from .host_math import cdiv, next_power_of_2

TILE_ELEMENTS = 4096    # a program's tile, rows × columns
TARGET_PROGRAMS = 128   # about an H100's SMs: the band width is chosen to fill them
NUM_WARPS = 4


@cached_launch
@triton.jit
def _column_sum_kernel(parts_ptr, out_ptr, n_rows, n_cols, inner, stride_out_outer, stride_out_inner,
                       BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    # parts: (n_rows, n_cols) contiguous fp32 -> out: column j at (j // inner, j % inner)
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    rows = tl.arange(0, BLOCK_ROWS)
    total = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    for step in range(tl.cdiv(n_rows, BLOCK_ROWS)):
        at = step * BLOCK_ROWS + rows
        ok = (at[:, None] < n_rows) & col_ok[None, :]
        total += tl.load(parts_ptr + at[:, None].to(tl.int64) * n_cols + cols[None, :], mask=ok, other=0.0)
    out = out_ptr + (cols // inner) * stride_out_outer + (cols % inner) * stride_out_inner
    tl.store(out, tl.sum(total, axis=0).to(out_ptr.dtype.element_ty), mask=col_ok)


def column_sum(parts: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """parts: (m, *shape) fp32, contiguous; out: shape (1 or 2 dims), any dtype and strides ->
    out, holding the sum over the m rows (in fp32, rounded once to out's dtype)."""
    assert parts.is_contiguous() and parts.dtype == torch.float32 and parts.shape[1:] == out.shape, \
        (tuple(parts.shape), parts.dtype, tuple(out.shape))
    assert out.dim() in (1, 2), f"column_sum: a 1-D or 2-D output, found {tuple(out.shape)}"
    n_rows, n_cols = parts.shape[0], out.numel()
    if n_cols == 0:
        return out
    if n_rows == 0:
        return out.zero_()
    inner = out.shape[-1]
    stride_outer, stride_inner = (out.stride(0), out.stride(1)) if out.dim() == 2 else (0, out.stride(0))
    block_cols = min(128, max(16, next_power_of_2(cdiv(n_cols, TARGET_PROGRAMS))))
    block_rows = min(TILE_ELEMENTS // block_cols, next_power_of_2(n_rows))
    _column_sum_kernel[(cdiv(n_cols, block_cols),)](
        parts, out, n_rows, n_cols, inner, stride_outer, stride_inner,
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=NUM_WARPS,
    )
    return out
