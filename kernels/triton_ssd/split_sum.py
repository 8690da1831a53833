"""The sum of a head-split launcher's fp32 partials (launch.split_output): one pass that reads
every split and writes the result once, in the output's dtype and strides.

torch's `partials.sum(0)` was followed by a second kernel wherever the output is bf16 or a
strided view (dB and dC written into the conv's gradient), and a TP=2 rank's single group makes
the dB and dC launchers split too. H100, medians from a CUDA graph (`bench/bench_split_sum.py`),
at the 1.3b step's shapes: dcb on one GPU (2 splits of 16 MiB) 0.0325 → 0.0175 ms (2.9 TB/s); a
TP=2 rank's dcb (4 splits of 8 MiB) 0.0215 → 0.0115 ms (3.6 TB/s); a TP=2 rank's dB (2 splits,
bf16, strided) 0.0089 → 0.0029 ms (3.7 TB/s). (twenty-fourth session; the dcb figures before
the output was seen as rows of its last dim were 0.0230 and 0.0241 ms.)
"""

import math

import torch
import triton
import triton.language as tl

from ..cached_launch import cached_launch
from ..host_math import cdiv, next_power_of_2

BLOCK_ELEMENTS = 4096   # a program's tile, rows × columns
NUM_WARPS = 4


@cached_launch
@triton.jit
def _split_sum_kernel(partials_ptr, out_ptr, n_rows, n_cols, stride_split, stride_out_row,
                      SPLITS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    # partials: (SPLITS, n_rows, n_cols) contiguous, fp32  ->  out: (n_rows, n_cols), unit column stride
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    # 64-bit offsets, and the pointers stepped a split at a time: split · stride_split would
    # be a 32-bit product
    partials = partials_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    total = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    for _ in tl.static_range(SPLITS):
        total += tl.load(partials, mask=mask, other=0.0)
        partials += stride_split
    out = out_ptr + rows[:, None].to(tl.int64) * stride_out_row + cols[None, :]
    tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor | None:
    # t as a (rows, cols) view with unit column stride and rows that do not overlap, with as few
    # columns as its strides allow: the last dim, or the fewest trailing dims after which the
    # leading ones merge (B's half of the conv gradient: (b·l, g·n), as l does not merge with
    # g); None if there is no such view (a view can merge dims into a column stride other than
    # 1, e.g. through a trailing dim of size 1, or into rows that overlap, as expand's do).
    # Few columns, many rows: a tile of 256 columns and 16 rows is full (a contiguous output
    # seen as one row of every element filled one row of each tile)
    for trailing in range(1, t.dim() + 1):
        try:
            rows = t.view(-1, math.prod(t.shape[t.dim() - trailing:]))
        except RuntimeError:
            continue
        n_rows, n_cols = rows.shape
        if (n_cols == 1 or rows.stride(1) == 1) and (n_rows == 1 or rows.stride(0) >= n_cols):
            return rows
    return None


def split_sum(partials: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """partials: (splits, *shape) fp32, contiguous; out: shape, any dtype and strides → out,
    holding the sum over the splits (in fp32, rounded once to out's dtype)."""
    assert partials.is_contiguous() and partials.dtype == torch.float32 and partials.shape[1:] == out.shape
    rows = _as_rows(out)
    if rows is None or out.numel() == 0:   # no 2-D view of it: torch's two kernels
        return out.copy_(partials.sum(0))
    n_rows, n_cols = rows.shape
    block_cols = min(next_power_of_2(n_cols), 256)
    block_rows = BLOCK_ELEMENTS // block_cols
    grid = (cdiv(n_rows, block_rows), cdiv(n_cols, block_cols))
    _split_sum_kernel[grid](partials, rows, n_rows, n_cols, partials.stride(0), rows.stride(0),
                            SPLITS=partials.shape[0], BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
                            num_warps=NUM_WARPS)
    return out
