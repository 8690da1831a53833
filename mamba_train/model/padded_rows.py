"""in_proj's matmul: its output rows padded to a multiple of 16 elements, and under autocast
its weight gradient written straight in the weight's fp32.

The mixer's kernels read in_proj's output (b, l, W) by column slices (z, x|B|C, dt) and write
its gradient the same way. Triton issues 16-byte vector loads and stores of a row only when it
can prove the row stride divisible by 16 elements, which it learns by specialising integer
arguments on exactly that. W = 2·d_inner + 2·ngroups·d_state + nheads is not always so: at 130m
(24 heads) W = 3352, and there the conv's forward took 0.219 ms against 0.117 on rows of 3360,
the gated norm's backward 0.345 against 0.236 (H100, b16 L2048: bench/bench_row_stride.py).

So when W is not a multiple of 16 the product is taken with the weight padded by zero rows and
the output is the first W columns of each padded row: the same values, 16-aligned rows, and a
few more FLOPs (8 of 3352 rows at 130m). Backward reads the gradient in the same padded layout
(`kernels.mixer_body` writes it so) and never materialises the padding. The one-process model's
in_proj is a `PaddedRowsLinear`; the parallel model's column-parallel in_proj takes the same
product when its tensor-parallel group has one rank (mamba_train/parallel/tensor_parallel.py).

Under autocast the same op stands in for F.linear's cast of the fp32 weight even when no row
needs padding: its backward writes the weight's gradient in fp32 from cuBLAS
(`kernels.wide_matmul`) where autocast would take it in bf16 and cast it: no bf16 rounding of
the sum over tokens, and with out_proj's weight gradient taken the same way (kernels.mixer_body)
a 1.3b step's copies and casts went from 10.7 to 6.7 ms of CUDA time (`bench_train.py
--profile --models 1.3b`, H100).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.wide_matmul import matmul_in_dtype

ROW_MULTIPLE = 16   # elements: what Triton's integer specialisation proves about a stride


class _PaddedRowsLinear(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, weight, dtype):
        out_features = weight.shape[0]
        u = u.to(dtype)
        rows = -(-out_features // ROW_MULTIPLE) * ROW_MULTIPLE
        if rows == out_features:
            cast = weight.to(dtype)
        else:   # the cast and the padding in one copy of the weight
            cast = weight.new_empty((rows, weight.shape[1]), dtype=dtype)
            cast[:out_features].copy_(weight)
            cast[out_features:].zero_()
        # the cast weight, as autocast keeps it for backward: no second cast there
        ctx.save_for_backward(u, cast)
        ctx.weight_dtype = weight.dtype
        return F.linear(u, cast)[..., :out_features]

    @staticmethod
    def backward(ctx, dout):
        u, cast = ctx.saved_tensors
        dout = dout.to(u.dtype)
        du = dout @ cast[:dout.shape[-1]] if ctx.needs_input_grad[0] else None
        dweight = None
        if ctx.needs_input_grad[1]:
            dweight = matmul_in_dtype(dout.flatten(0, -2).t(), u.flatten(0, -2), ctx.weight_dtype)
        return du, dweight, None


def padded_rows_linear(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(u, weight)` (no bias; under autocast in its dtype, as F.linear runs) whose
    output rows have a stride that is a multiple of ROW_MULTIPLE: a view of a padded tensor when
    the weight's rows are not. Under autocast the weight's gradient comes in its own dtype
    straight from the matmul."""
    device, dtype = u.device.type, u.dtype
    if torch.is_autocast_enabled(device) and weight.dtype != torch.float64:   # autocast leaves float64 be
        dtype = torch.get_autocast_dtype(device)
    if weight.shape[0] % ROW_MULTIPLE == 0 and dtype == weight.dtype:
        return F.linear(u, weight)
    return _PaddedRowsLinear.apply(u, weight, dtype)


class PaddedRowsLinear(nn.Linear):
    """A bias-free nn.Linear whose output rows are padded (`padded_rows_linear`); the same
    parameter and state-dict key as nn.Linear's."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return padded_rows_linear(u, self.weight)
