"""The gated grouped RMSNorm, and the residual add fused with the norm after it."""

import torch
import torch.nn.functional as F

from .common import _compute_dtype, _expect_shape


def _check_norm_inputs(x, z, weight, group_size):
    """The gated norm's argument checks, shared with the Triton path; returns the group size."""
    d = x.shape[-1]
    group_size = d if group_size is None else group_size
    if group_size < 1 or d % group_size:
        raise ValueError(f"group_size: expected a positive divisor of x's last dim {d} "
                         f"(x has shape {tuple(x.shape)}), found {group_size}")
    _expect_shape("z", z, x.shape, "(like x)")
    _expect_shape("weight", weight, (d,), "(dim,)")
    return group_size


def rmsnorm_gated(x, z, weight, eps=1e-5, group_size=None, out_dtype=None):
    """RMSNorm per group of `group_size` channels of x·silu(z), times weight.

    The gate comes BEFORE the norm: mamba_ssm's `norm_before_gate=False` and transformers'
    `MambaRMSNormGated`. Statistics in float32 (float64 for float64 x), result in out_dtype
    (default x's dtype); the weight is applied in float32 before the cast, as mamba_ssm's
    kernel does.
    """
    # x, z, out: (..., d)  weight: (d,)
    d = x.shape[-1]
    group_size = _check_norm_inputs(x, z, weight, group_size)
    cdt = _compute_dtype(x)
    hidden = x.to(cdt)
    if z is not None:
        hidden = hidden * F.silu(z.to(cdt))
    groups = hidden.reshape(*x.shape[:-1], d // group_size, group_size)
    groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)
    return (groups.reshape(x.shape) * weight.to(cdt)).to(out_dtype or x.dtype)


def _check_add_norm_inputs(residual, update, weight, out_parts=1, gather_rank=None):
    """add_rmsnorm's argument checks, shared with the Triton path -> how many parts the update
    comes in (1: a tensor like residual)."""
    if int(out_parts) < 1:
        raise ValueError(f"out_parts: expected a positive count, found {out_parts}")
    if gather_rank is not None and not 0 <= gather_rank < out_parts:
        raise ValueError(f"gather_rank: expected a rank below out_parts={out_parts}, found {gather_rank}")
    parts = update.shape[0] if update.dim() == residual.dim() + 1 else 1
    _expect_shape("update", update, residual.shape if update.dim() == residual.dim() else (parts, *residual.shape),
                  "(like residual, or (parts, *residual's shape) partial sums of it)")
    _expect_shape("weight", weight, (residual.shape[-1],), "(dim,)")
    return parts


def gathered_rows(shape, parts: int, rank: int, dtype, device) -> torch.Tensor:
    """A new tensor of `shape` that is rank `rank`'s rows of one `parts` times as tall along dim
    0 (its `_base`): a producer writes there, and the all-gather after it (TokenSplit's
    gather_matmul) finds this rank's rows of its output in place instead of copying them
    (`gathered_base`)."""
    tall = torch.empty((parts * shape[0], *shape[1:]), dtype=dtype, device=device)
    # the mark gathered_base asks for: a view of some other tensor of the right height is
    # not one to gather into (the gather overwrites the other ranks' rows). torch keeps a
    # tensor's Python object, attributes included, while views of it live
    tall._gathered_rows_of = parts
    return tall[rank * shape[0]:(rank + 1) * shape[0]]


def gathered_base(rows: torch.Tensor, parts: int, rank: int) -> torch.Tensor | None:
    """The tensor gathered_rows made `rows` rank `rank`'s rows of, if it did, else None."""
    tall = rows._base
    if tall is None or getattr(tall, "_gathered_rows_of", None) != parts or not rows.is_contiguous() \
            or tall.shape != (parts * rows.shape[0], *rows.shape[1:]) or tall.dtype != rows.dtype:
        return None
    return tall if rows.data_ptr() == tall[rank * rows.shape[0]].data_ptr() else None


def add_rmsnorm(residual, update, weight, eps=1e-5, out_dtype=None, out_parts=1, gather_rank=None):
    """A pre-norm block's residual add fused with the next norm: (residual + update, in their
    promoted dtype, and the RMSNorm of that sum times weight, in out_dtype (default the sum's)).

    The model adds each block's mixer output to the residual stream here, at the next block's
    norm (mamba_ssm's fused_add_norm), so that the stream is read and written once for both.
    The update may come as partial sums, (parts, *residual's shape): a row-parallel out_proj's
    terms from each tensor-parallel rank (mixer_body's out_scatter), added here in fp32 with
    the stream rather than by a separate kernel first. Backward works the same way round with
    out_parts > 1: the norm's output is returned seen out_parts times, (out_parts, ..., d) with
    stride 0, for a consumer whose backward gives its gradient as terms (under tp_comm_overlap,
    in_proj's: each rank's term of this rank's rows), and the norm's backward sums them. With
    gather_rank (this TP rank, for in_proj's all-gather) the norm is written into that rank's
    rows of a tensor out_parts times as tall (`gathered_rows`); the Triton backward likewise
    writes the update's gradient for out_proj's all-gather, where that gradient is a tensor of
    its own (the update in another dtype than the residual, as under bf16 autocast)."""
    # residual, sum: (..., d)  norm: (..., d) | (out_parts, ..., d)  update: (..., d) | (parts, ..., d)
    _check_add_norm_inputs(residual, update, weight, out_parts, gather_rank)
    if update.dim() == residual.dim():
        total = residual + update
    else:
        cdt = torch.promote_types(_compute_dtype(residual), _compute_dtype(update))
        total = (residual.to(cdt) + _SumOfTerms.apply(update, cdt)).to(torch.promote_types(residual.dtype,
                                                                                           update.dtype))
    normed = rmsnorm_gated(total, None, weight, eps, out_dtype=out_dtype)
    if gather_rank is not None:
        rows = gathered_rows(normed.shape, out_parts, gather_rank, normed.dtype, normed.device)
        normed = rows.copy_(normed)
    return total, (normed if out_parts == 1 else normed.expand(out_parts, *normed.shape))


class _SumOfTerms(torch.autograd.Function):
    """terms.sum(0) in dtype, whose backward hands every term the sum's gradient as one tensor
    (stride 0 along the terms, in the terms' dtype), as the Triton norm does: `parts_gradient`
    relies on it. Autograd's own sum and cast would give a copy per term."""

    @staticmethod
    def forward(ctx, terms, dtype):
        # terms: (parts, ...)  ->  (...) in dtype
        ctx.shape, ctx.dtype = terms.shape, terms.dtype
        return terms.to(dtype).sum(0)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype).expand(ctx.shape), None
