"""The mixer body: in_proj's output to out_proj's, chained from the other reference ops."""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .common import _compute_dtype, _expect_integer, _expect_shape
from .conv import causal_conv1d
from .norm import rmsnorm_gated
from .ssd import _process_dt, ssd_chunked


class MixerSizes(NamedTuple):
    d_inner: int
    conv_dim: int
    nheads: int
    headdim: int
    ngroups: int
    d_state: int


def check_mixer_inputs(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_weight, ngroups, seq_idx):
    """The mixer body's argument checks, shared with the Triton path; returns its sizes, read
    off the weights."""
    d_inner, nheads, conv_dim = out_weight.shape[1], dt_bias.shape[0], conv_weight.shape[0]
    bc_dim = conv_dim - d_inner
    if ngroups < 1 or nheads % ngroups or d_inner % nheads or bc_dim <= 0 or bc_dim % (2 * ngroups):
        raise ValueError(f"mixer_body: inconsistent sizes: out_proj in {d_inner}, conv channels {conv_dim}, "
                         f"{nheads} heads, ngroups {ngroups} (expected conv channels = d_inner + 2·ngroups·d_state, "
                         "ngroups dividing nheads, nheads dividing d_inner)")
    width = d_inner + conv_dim + nheads
    if zxbcdt.dim() != 3 or zxbcdt.shape[-1] != width:
        raise ValueError(f"zxbcdt: expected shape (batch, seqlen, {width}) [z | x | B | C | dt], "
                         f"found {tuple(zxbcdt.shape)}")
    if conv_weight.dim() != 2 or not 2 <= conv_weight.shape[1] <= 4:
        raise ValueError(f"conv_weight: expected shape ({conv_dim}, width) with width in 2..4, "
                         f"found {tuple(conv_weight.shape)}")
    _expect_shape("conv_bias", conv_bias, (conv_dim,), "(conv channels,)")
    _expect_shape("A", A, (nheads,), "(nheads,)")
    if D is not None and tuple(D.shape) not in ((nheads,), (nheads, d_inner // nheads)):
        raise ValueError(f"D: expected shape ({nheads},) or ({nheads}, {d_inner // nheads}), found {tuple(D.shape)}")
    _expect_shape("norm_weight", norm_weight, (d_inner,), "(d_inner,)")
    _expect_shape("seq_idx", seq_idx, zxbcdt.shape[:2], "(batch, seqlen)")
    _expect_integer("seq_idx", seq_idx)
    return MixerSizes(d_inner, conv_dim, nheads, d_inner // nheads, ngroups, bc_dim // (2 * ngroups))


def mixer_body(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_weight, *, ngroups, chunk_size,
               norm_eps=1e-5, dt_limit=(0.0, math.inf), seq_idx=None, context_parallel=None,
               keep_activations=False, out_scatter=None):
    """A Mamba-2 mixer from in_proj's output to out_proj's, as mamba_ssm's `Mamba2` computes it:
    split [z | x | B | C | dt], causal conv + SiLU over [x | B | C], SSD with softplus(dt +
    dt_bias), the gated norm per group of norm(y·silu(z)), then out_proj (no bias) in y's dtype.

    context_parallel: for one piece of a sequence cut over ranks, the hook that links it to the
    pieces before it (`mamba_train.parallel.context_parallel.ContextParallel`): `halo(tail)`
    gives the conv the rows before the piece, and `state_in(final_state, log_decay)` the SSM
    state entering it, from this piece's state run from zero and its total log decay Σ A·dt.
    Here autograd differentiates both; the Triton op runs its own backward and calls
    `state_in_async` instead of state_in, `halo_grad(dhalo)` (the gradient of this piece's
    tail) and `final_state_grad_async(dstate_in, log_decay)` (the gradient of this piece's final
    state, from the pieces after it): the _async forms take the dtype the states travel in
    too, start their collective and return a function that gives its result, as
    `kernels.reference.ssd.WeightedStates`. On CUDA the Triton op may instead relay the states
    rank to rank: `relays(state_shape, wire_dtype, device)` says whether, and
    `relay_forward` / `relay_backward` (mamba_train.parallel.context_parallel) give each pass.

    keep_activations: whether backward may keep the conv's and the gated norm's outputs rather
    than recompute them (the Triton op's choice of memory against time). These chained ops are
    differentiated by autograd, which keeps them either way.

    out_scatter: for an out_proj split by input columns over a group of ranks (tensor
    parallelism), the object that exchanges its product's rows between them, so that this rank
    gets every rank's term of its rows of the batch
    (`mamba_train.parallel.sequence_parallel.TokenSplit`): `matmul_parts(a, w_t)` gives
    this rank's rows of each rank's a @ w_t, and for backward `gather_matmul(g, w)` gives (every
    rank's rows of g, those @ w). The result is then those terms, (ranks, b / ranks, l, d_model),
    for add_rmsnorm to sum with the stream: it must reach the loss only through their sum."""
    # zxbcdt: (b, l, d_inner + conv_dim + h)  conv_weight: (conv_dim, w)  A, dt_bias: (h,)
    # D: (h,) | (h, p)  norm_weight: (d_inner,)  out_weight: (d_model, d_inner)
    # -> (b, l, d_model) | with out_scatter (ranks, b / ranks, l, d_model)
    s = check_mixer_inputs(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_weight, ngroups, seq_idx)
    b, l = zxbcdt.shape[:2]
    z, xBC, dt = zxbcdt.split((s.d_inner, s.conv_dim, s.nheads), dim=-1)
    halo = None if context_parallel is None else context_parallel.halo(xBC[:, l - (conv_weight.shape[1] - 1):])
    xBC = causal_conv1d(xBC, conv_weight, conv_bias, activation="silu", initial_state=halo, seq_idx=seq_idx)
    x, B, C = xBC.split((s.d_inner, ngroups * s.d_state, ngroups * s.d_state), dim=-1)
    x = x.reshape(b, l, s.nheads, s.headdim)
    B, C = B.reshape(b, l, ngroups, s.d_state), C.reshape(b, l, ngroups, s.d_state)
    ssd_args = dict(dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit, seq_idx=seq_idx)
    state_in = None
    if context_parallel is not None:
        _, zero_start_final = ssd_chunked(x, dt, A, B, C, chunk_size, return_final_states=True, **ssd_args)
        cdt = _compute_dtype(x)
        log_decay = (_process_dt(dt.to(cdt), dt_bias.to(cdt), True, dt_limit) * A.to(cdt)).sum(dim=1)   # (b, h)
        state_in = context_parallel.state_in(zero_start_final, log_decay)
    y = ssd_chunked(x, dt, A, B, C, chunk_size, D=D, initial_states=state_in, **ssd_args)
    y = rmsnorm_gated(y.reshape(b, l, s.d_inner), z, norm_weight, eps=norm_eps, group_size=s.d_inner // ngroups)
    if out_scatter is not None:
        return _ProductTerms.apply(y, out_weight, out_scatter)
    return F.linear(y, out_weight.to(y.dtype))


def parts_gradient(grad_parts):
    """The gradient of a sum's terms (mixer_body's with out_scatter) -> the sum's. The terms
    reach the loss only through their sum (add_rmsnorm), so each term's gradient is the sum's
    and autograd hands over one tensor for all of them (stride 0 along the terms)."""
    # grad_parts: (parts, ...)  ->  (...)
    if grad_parts.shape[0] > 1 and grad_parts.stride(0) != 0:
        raise RuntimeError("mixer_body with out_scatter returns the terms of a sum: they must reach the loss "
                           "only through their sum (kernels.add_rmsnorm adds them to the residual stream)")
    return grad_parts[0]


class _ProductTerms(torch.autograd.Function):
    """mixer_body's out_proj with out_scatter: this rank's rows of each rank's y @ weightᵀ."""

    @staticmethod
    def forward(ctx, y, weight, out_scatter):
        w = weight.to(y.dtype)
        ctx.save_for_backward(y, w)
        ctx.out_scatter, ctx.weight_dtype = out_scatter, weight.dtype
        return out_scatter.matmul_parts(y, w.t())

    @staticmethod
    def backward(ctx, grad):
        y, w = ctx.saved_tensors
        grad_full, grad_y = ctx.out_scatter.gather_matmul(parts_gradient(grad).to(y.dtype).contiguous(), w)
        grad_weight = (grad_full.flatten(0, -2).t() @ y.flatten(0, -2)).to(ctx.weight_dtype)
        return grad_y, grad_weight, None
