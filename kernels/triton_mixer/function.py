"""The mixer body on Triton: in_proj's output to out_proj's in one autograd Function that
keeps for backward only in_proj's output, the SSD's output y and the SSD's states entering each
chunk (half of y's bytes at chunk 256, n 128: kernels/triton_ssd/combined.py).

Chained op by op (conv, SSD, gated norm, out_proj), autograd would keep the conv's output
(x, B, C) for the SSD and the gated norm's output for out_proj: two more activations of
d_inner channels a token, about 6 GiB of a 1.3b step at batch 4 × 2048. Backward recomputes
both, as mamba_ssm's fused path does: the conv by a forward, the norm's output inside the
norm's backward kernel, which reads its inputs anyway and takes each row's 1/rms kept from
forward (so the output comes back bit for bit). With `keep_activations` it keeps them instead
(train.recompute="none"): the same results bit for bit, about 5% less time a step at 130m
where memory is plentiful (docs/design-notes.md).

Owning the layout also drops the chained ops' copies: the conv runs as two depthwise convs (x's
channels, then B|C's) so that x comes out contiguous for the SSD, and every gradient of
in_proj's output (dz, the conv's input gradient, ddt) is written into one tensor instead of
three concatenated.

Under context parallelism the op takes the hook (kernels.reference.mixer_body says what it
supplies) and runs its collectives itself: the halo and the incoming state in forward, their
gradients in backward (mamba_train/parallel/context_parallel.py says how the state's works),
so the halo's gradient lands in the rows of in_proj's output gradient it belongs to."""

import copy
import math

import torch

from ..reference.mixer import check_mixer_inputs, parts_gradient
from ..reference.ssd import _check_chunk_size
from ..triton_conv.conv1d import conv1d_bwd, conv1d_fwd
from ..triton_norm.rmsnorm import rmsnorm_gated_bwd, rmsnorm_gated_fwd
from ..triton_ssd.combined import _contiguous, ssd_bwd, ssd_fwd
from ..wide_matmul import matmul_in_dtype


def _channels(t, start, stop):
    return None if t is None else t[..., start:stop] if t.dim() == 3 else t[start:stop]


def _conv_parts(s):
    # the conv is depthwise: x's channels and B|C's run as two convs, each writing its own
    # contiguous output, so the SSD reads x with no copy out of a (b, l, conv_dim) tensor
    return (0, s.d_inner), (s.d_inner, s.conv_dim)


def _conv_fwd(xBC_in, conv_weight, conv_bias, halo, seq_idx, s):
    # in_proj's xBC columns (and the rows before them, or None) -> the SSD's x (b, l, h, p)
    # contiguous, B and C (b, l, g, n) views
    b, l = xBC_in.shape[:2]
    x, BC = (conv1d_fwd(_channels(xBC_in, *part), _channels(conv_weight, *part), _channels(conv_bias, *part),
                        _channels(halo, *part), seq_idx, "silu")[0] for part in _conv_parts(s))
    B, C = (t.view(b, l, s.ngroups, s.d_state) for t in BC.split(s.ngroups * s.d_state, dim=-1))
    return x.view(b, l, s.nheads, s.headdim), B, C


def _conv_bwd(dx, dBC, xBC_in, conv_weight, conv_bias, halo, seq_idx, s, dxBC_in):
    # the SSD's input gradients (dx, and dB|dC in one tensor) -> the conv's, written into
    # dxBC_in; -> dweight, dbias, dhalo
    b, l = xBC_in.shape[:2]
    douts = (dx.view(b, l, s.d_inner), dBC)
    grads = [conv1d_bwd(dout, None, _channels(xBC_in, *part), _channels(conv_weight, *part),
                        _channels(conv_bias, *part), _channels(halo, *part), seq_idx, "silu",
                        dx_out=_channels(dxBC_in, *part))
             for dout, part in zip(douts, _conv_parts(s))]
    (_, dweight_x, dbias_x, dhalo_x), (_, dweight_bc, dbias_bc, dhalo_bc) = grads
    dweight = torch.cat([dweight_x, dweight_bc])
    dbias = torch.cat([dbias_x, dbias_bc]) if conv_bias is not None else None
    dhalo = torch.cat([dhalo_x, dhalo_bc], dim=-1) if halo is not None else None
    return dweight, dbias, dhalo


class MixerBodyFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_weight, seq_idx, sizes,
                chunk_size, norm_eps, dt_limit, context_parallel, keep_activations, out_scatter):
        s = sizes
        b, l = zxbcdt.shape[:2]
        z, xBC_in, dt = zxbcdt.split((s.d_inner, s.conv_dim, s.nheads), dim=-1)
        # context parallelism: the conv rows before this piece; its SSD's initial state comes
        # inside ssd_fwd (kernels/triton_ssd/combined.py)
        halo = None if context_parallel is None else context_parallel.halo(xBC_in[:, l - (conv_weight.shape[1] - 1):])
        x, B, C = _conv_fwd(xBC_in, conv_weight, conv_bias, halo, seq_idx, s)
        y, _, _, states_in = ssd_fwd(x, dt.contiguous(), A, B, C, chunk_size, D, None, dt_bias, None, seq_idx, True,
                                     dt_limit, context_parallel)
        y = y.view(b * l, s.d_inner)
        # each row's 1 / rms, kept (4 bytes a row and group): backward reads it rather than
        # recomputing it, and so gets the forward's normed output back bit for bit
        rstd = torch.empty(s.ngroups, b * l, device=y.device, dtype=torch.float32)
        normed = rmsnorm_gated_fwd(y, z.reshape(b * l, s.d_inner), norm_weight, norm_eps, s.d_inner // s.ngroups,
                                   rstd=rstd)
        # out_proj in y's dtype, as autocast would run it (the weight cast, not cached); with
        # out_scatter, this rank's rows of each term of the sum over the ranks that hold
        # out_proj's other columns (the next norm adds them)
        w_t = out_weight.to(normed.dtype).t()
        if out_scatter is not None:
            out = out_scatter.matmul_parts(normed.view(b, l, -1), w_t)
        else:
            out = (normed @ w_t).view(b, l, -1)
        kept = (x, B, C, normed) if keep_activations else (None,) * 4
        ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_weight, seq_idx, y,
                              states_in, rstd, halo, *kept)
        ctx.sizes, ctx.chunk_size, ctx.norm_eps, ctx.dt_limit = s, chunk_size, norm_eps, dt_limit
        # a shallow copy: the hook's document masks as they are now (a later forward's begin()
        # replaces them, and this backward must use the ones this forward used)
        ctx.context_parallel = copy.copy(context_parallel)
        ctx.out_scatter = out_scatter
        return out

    @staticmethod
    def backward(ctx, dout):
        (zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_weight, seq_idx, y, states_in, rstd,
         halo, x, B, C, normed) = ctx.saved_tensors
        s, group_size, context_parallel = ctx.sizes, ctx.sizes.d_inner // ctx.sizes.ngroups, ctx.context_parallel
        b, l = zxbcdt.shape[:2]
        z, xBC_in, dt = zxbcdt.split((s.d_inner, s.conv_dim, s.nheads), dim=-1)
        z = z.reshape(b * l, s.d_inner)
        # in zxbcdt's layout: in_proj's backward reads it with the same (16-aligned) row stride
        dzxbcdt = torch.empty_strided(zxbcdt.shape, zxbcdt.stride(), dtype=zxbcdt.dtype, device=zxbcdt.device)
        dz, dxBC_in, ddt_slot = dzxbcdt.split((s.d_inner, s.conv_dim, s.nheads), dim=-1)

        # out_proj's input gradient, the gated norm's backward, then out_proj's weight gradient
        # from the norm's output: kept, or written again by the norm's backward from the x and z
        # it reads anyway (no second pass over them)
        if ctx.out_scatter is None:
            dout = dout.reshape(b * l, -1).to(y.dtype)
            dnormed = dout @ out_weight.to(y.dtype)
        else:   # this rank's rows (each part's gradient): every rank's, and their product, together
            dout, dnormed = ctx.out_scatter.gather_matmul(parts_gradient(dout).to(y.dtype).contiguous(),
                                                          out_weight.to(y.dtype))
            dout, dnormed = dout.view(b * l, -1), dnormed.view(b * l, -1)
        recomputed = torch.empty_like(y) if normed is None else None
        dy, _, dnorm_weight = rmsnorm_gated_bwd(dnormed, y, z, norm_weight, ctx.norm_eps, group_size,
                                                dz_out=dz.reshape(b * l, s.d_inner), rstd=rstd, out=recomputed)
        del dnormed
        dout_weight = matmul_in_dtype(dout.t(), normed if recomputed is None else recomputed, out_weight.dtype)
        del normed, recomputed

        # the SSD, its inputs recomputed by the conv unless kept
        if x is None:
            x, B, C = _conv_fwd(xBC_in, conv_weight, conv_bias, halo, seq_idx, s)
        # dB and dC written side by side, as the conv's B|C channels lie: its gradient, no cat
        dBC = torch.empty(b, l, 2 * s.ngroups * s.d_state, device=B.device, dtype=B.dtype)
        dB, dC = (t.view(b, l, s.ngroups, s.d_state) for t in dBC.split(s.ngroups * s.d_state, dim=-1))
        dx, ddt, dA, _, _, dD, _, ddt_bias, _ = ssd_bwd(
            dy.view(b, l, s.nheads, s.headdim), None, x, dt.contiguous(), A, B, C, ctx.chunk_size, D, None, dt_bias,
            None, seq_idx, None, states_in, True, ctx.dt_limit, need_dinit=False, context_parallel=context_parallel,
            dB_out=dB, dC_out=dC)
        del x, B, C, dy, states_in, dB, dC
        ddt_slot.copy_(ddt)
        dconv_weight, dconv_bias, dhalo = _conv_bwd(dx, dBC, xBC_in, conv_weight, conv_bias, halo, seq_idx, s,
                                                    dxBC_in)
        if context_parallel is not None:
            # the halo is the previous piece's tail: the next piece's halo gradient is this one's
            dxBC_in[:, l - dhalo.shape[1]:] += context_parallel.halo_grad(dhalo)
        return (dzxbcdt, dconv_weight, dconv_bias, ddt_bias, dA, dD, dnorm_weight, dout_weight,
                None, None, None, None, None, None, None, None)


def mixer_body_triton(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_weight, *, ngroups, chunk_size,
                      norm_eps=1e-5, dt_limit=(0.0, math.inf), seq_idx=None, context_parallel=None,
                      keep_activations=False, out_scatter=None):
    """The mixer from in_proj's output to out_proj's (Triton); same signature and result as
    `kernels.reference.mixer_body`. keep_activations: backward reads the conv's and the gated
    norm's outputs kept from forward instead of recomputing them ((conv_dim + d_inner) · 2 bytes
    a token more in bf16)."""
    s = check_mixer_inputs(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_weight, ngroups, seq_idx)
    _check_chunk_size(chunk_size)
    # the kernels read A, D, dt_bias with unit stride along heads, and zxbcdt by rows with unit
    # stride along channels: rows may be padded (mamba_train/model/padded_rows.py), but
    # (batch, seqlen) must flatten to rows without a copy, since the gradients of z and of the
    # conv's input are written through such views
    A, D, dt_bias, seq_idx = (_contiguous(t) for t in (A, D, dt_bias, seq_idx))
    if zxbcdt.stride(-1) != 1 or zxbcdt.stride(0) != zxbcdt.shape[1] * zxbcdt.stride(1):
        zxbcdt = zxbcdt.contiguous()
    return MixerBodyFunction.apply(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_weight, seq_idx, s,
                                   chunk_size, float(norm_eps), tuple(float(v) for v in dt_limit), context_parallel,
                                   keep_activations, out_scatter)
