"""The public gated grouped RMSNorm on Triton, and the residual add fused with the norm after it:
the forward and backward kernels of each as one autograd Function."""

import torch

from ..reference.norm import _check_add_norm_inputs, _check_norm_inputs, gathered_rows
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


class AddRMSNormFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, residual, update, weight, eps, out_dtype, parts, out_parts, gather_rank):
        # update: like residual, or (parts, *residual's shape) partial sums of it; with out_parts
        # > 1 the norm's output is returned seen out_parts times (stride 0), and its gradient
        # comes as that many terms, summed by the backward kernel as it reads them. gather_rank
        # (None, or this TP rank): the norm written into this rank's rows of a taller tensor,
        # and backward the update's gradient likewise (reference.norm.gathered_rows)
        dim = residual.shape[-1]
        out = None
        if gather_rank is not None:
            out = gathered_rows(residual.shape, out_parts, gather_rank, out_dtype or residual.dtype,
                                residual.device).view(-1, dim)
        total, out = rmsnorm_gated_fwd(residual.reshape(-1, dim), None, weight, eps, dim, out_dtype,
                                       update=update.reshape(parts, -1, dim) if parts > 1 else update.reshape(-1, dim),
                                       out=out)
        ctx.save_for_backward(total, weight)
        ctx.eps, ctx.update_dtype, ctx.out_dtype, ctx.shape = eps, update.dtype, out.dtype, residual.shape
        ctx.update_shape, ctx.gather_rank = update.shape, gather_rank
        # an unused output's gradient arrives as None, not as a tensor of zeros to read
        ctx.set_materialize_grads(False)
        out = out.view(residual.shape)
        return total.view(residual.shape), (out if out_parts == 1 else out.expand(out_parts, *out.shape))

    @staticmethod
    def backward(ctx, dtotal, dout):
        total, weight = ctx.saved_tensors
        # dtotal: the sum's gradient from the rest of the stream, None where nothing else reads
        # it (the last norm); dout: the norm's, None only if its output went unused
        if dout is None:
            dout = total.new_zeros(total.shape, dtype=ctx.out_dtype)
        dout = dout.reshape(-1, *total.shape)   # (terms, rows, d)
        # both inputs get the sum's gradient: written a second time in the update's dtype where
        # that differs (bf16 beside an fp32 stream), else one tensor object returned for both.
        # Not two views of it: autograd would let two leaves' .grad share their storage, and
        # the next accumulation into one would change the other. One object it copies instead.
        second_dtype = None if ctx.update_dtype == total.dtype else ctx.update_dtype
        dupdate_out = None
        if second_dtype is not None and ctx.gather_rank is not None and len(ctx.update_shape) > len(ctx.shape):
            # the update's terms came from out_proj (mixer_body's out_scatter), whose backward
            # all-gathers this gradient: written into this rank's rows of the gathered tensor
            dupdate_out = gathered_rows(ctx.shape, ctx.update_shape[0], ctx.gather_rank, second_dtype,
                                        total.device).view(total.shape)
        dsum, _, dweight = rmsnorm_gated_bwd(
            dout, total, None, weight, ctx.eps, total.shape[1],
            dsum=None if dtotal is None else dtotal.reshape(total.shape), update_dtype=second_dtype,
            dupdate_out=dupdate_out)
        if second_dtype is None:
            dresidual = dupdate = dsum.view(ctx.shape)
        else:
            dresidual, dupdate = (d.view(ctx.shape) for d in dsum)
        if len(ctx.update_shape) > len(ctx.shape):
            # each partial sum's gradient is the sum's: one tensor, seen once a part (stride 0).
            # With one dtype, a view of dresidual's storage: the terms are no leaf (mixer_body's
            # output, which reads its gradient only), and a leaf's AccumulateGrad would copy a
            # gradient whose strides differ from its own
            dupdate = dupdate.expand(ctx.update_shape)
        return dresidual, dupdate, dweight, None, None, None, None, None


def add_rmsnorm_triton(residual, update, weight, eps=1e-5, out_dtype=None, out_parts=1, gather_rank=None):
    """residual + update and the RMSNorm of it, times weight, in one kernel each way (Triton);
    same signature and result as `kernels.reference.add_rmsnorm`."""
    parts = _check_add_norm_inputs(residual, update, weight, out_parts, gather_rank)
    return AddRMSNormFunction.apply(residual, update, weight, float(eps), out_dtype, parts, int(out_parts),
                                    gather_rank)
