"""The public gated grouped RMSNorm on Triton: the forward and backward kernels as one autograd Function."""

import torch

from ..reference import _check_norm_inputs
from .rmsnorm import rmsnorm_gated_bwd, rmsnorm_gated_fwd


class RMSNormGatedFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, z, weight, eps, group_size, out_dtype):
        # x, z: (..., d) flattened to rows (a view where the layout allows: no copy of the
        # model's z, a column slice of in_proj's output)
        dim = x.shape[-1]
        x2, z2 = x.reshape(-1, dim), (z.reshape(-1, dim) if z is not None else None)
        out = rmsnorm_gated_fwd(x2, z2, weight, eps, group_size, out_dtype)
        ctx.save_for_backward(x2, z2, weight)
        ctx.eps, ctx.group_size, ctx.shape = eps, group_size, x.shape
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, dout):
        x2, z2, weight = ctx.saved_tensors
        dx, dz, dweight = rmsnorm_gated_bwd(dout.reshape(x2.shape), x2, z2, weight, ctx.eps, ctx.group_size)
        dz = dz.reshape(ctx.shape) if dz is not None else None
        return dx.reshape(ctx.shape), dz, dweight, None, None, None


def rmsnorm_gated_triton(x, z, weight, eps=1e-5, group_size=None, out_dtype=None):
    """RMSNorm per group of `group_size` channels of x·silu(z), times weight (Triton); same
    signature and result as `kernels.reference.rmsnorm_gated`, output in out_dtype (default
    x's dtype)."""
    # x, z, out: (..., d)  weight: (d,)
    group_size = _check_norm_inputs(x, z, weight, group_size)
    return RMSNormGatedFunction.apply(x, z, weight, float(eps), int(group_size), out_dtype)
