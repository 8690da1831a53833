"""Stage 1 of SSD (DESIGN §3): process dt and take the per-chunk cumulative log-decay.

Forward:  dt' = clamp(softplus(dt + dt_bias), dt_min, dt_max), and within each chunk
          dA_cumsum[q] = sum_{s<=q} A·dt'_s (the exponent of the paper's segsum, §6).
Backward: every later stage adds its gradient w.r.t. dA_cumsum into one buffer; here the
          reverse cumsum turns it into a gradient w.r.t. A·dt', which joins the direct
          gradient w.r.t. dt' and flows back through the clamp and the softplus.
"""

import math

import torch
import triton
import triton.language as tl

from ..cached_launch import cached_launch
from ..host_math import cdiv, next_power_of_2
from . import launch


@triton.jit
def _softplus(v):
    # log(1 + e^v), as torch's softplus with threshold 20; for very negative v, 1 + e^v rounds
    # to 1 and the log would give 0, so use e^v there.
    return tl.where(v > 20.0, v, tl.where(v < -15.0, tl.exp(v), tl.log(1.0 + tl.exp(v))))


@triton.jit
def _biased_dt_tile(dt_ptr, dt_bias_ptr, seqlen, nheads, chunk_size, stride_dt_b, stride_dt_l, stride_dt_h,
                    HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr):
    # this program's (head block × chunk) tile of dt + dt_bias in fp32, with its offsets and mask
    pid_b, pid_c, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_q = tl.arange(0, BLOCK_Q)
    t = pid_c * chunk_size + offs_q
    mask = (offs_h[:, None] < nheads) & (offs_q[None, :] < chunk_size) & (t[None, :] < seqlen)
    dt_offs = pid_b * stride_dt_b + t[None, :] * stride_dt_l + offs_h[:, None] * stride_dt_h
    dt = tl.load(dt_ptr + dt_offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(dt_bias_ptr + offs_h, mask=offs_h < nheads, other=0.0).to(tl.float32)[:, None]
    return offs_h, offs_q, mask, dt_offs, dt


@cached_launch
@triton.jit
def _chunk_cumsum_fwd_kernel(
    dt_ptr, A_ptr, dt_bias_ptr, dt_out_ptr, dA_cumsum_ptr,
    seqlen, nheads, chunk_size, dt_min, dt_max,
    stride_dt_b, stride_dt_l, stride_dt_h,
    stride_out_b, stride_out_h, stride_out_c, stride_out_q,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # dt: (b, l, h)  ->  dt_out, dA_cumsum: (b, h, c, q); one program per (batch, chunk, head block)
    pid_b, pid_c = tl.program_id(0), tl.program_id(1)
    offs_h, offs_q, mask, _, dt = _biased_dt_tile(dt_ptr, dt_bias_ptr, seqlen, nheads, chunk_size, stride_dt_b,
                                                  stride_dt_l, stride_dt_h, HAS_BIAS, BLOCK_H, BLOCK_Q)
    if SOFTPLUS:
        dt = _softplus(dt)
    dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    dt = tl.where(mask, dt, 0.0)   # padded tokens: no input and no decay
    A = tl.load(A_ptr + offs_h, mask=offs_h < nheads, other=0.0).to(tl.float32)
    dA_cumsum = tl.cumsum(dt * A[:, None], axis=1)
    out_offs = (pid_b * stride_out_b + offs_h[:, None] * stride_out_h + pid_c * stride_out_c
                + offs_q[None, :] * stride_out_q)
    store_mask = (offs_h[:, None] < nheads) & (offs_q[None, :] < chunk_size)
    tl.store(dt_out_ptr + out_offs, dt, mask=store_mask)
    tl.store(dA_cumsum_ptr + out_offs, dA_cumsum, mask=store_mask)


@cached_launch
@triton.jit
def _chunk_cumsum_bwd_kernel(
    ddA_cumsum_ptr, ddt_out_ptr, dt_ptr, A_ptr, dt_bias_ptr,
    ddt_ptr, dA_part_ptr, ddt_bias_part_ptr,
    seqlen, nheads, chunk_size, dt_min, dt_max,
    stride_dt_b, stride_dt_l, stride_dt_h,
    stride_g_b, stride_g_h, stride_g_c, stride_g_q,
    stride_part_b, stride_part_c,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # ddA_cumsum, ddt_out: (b, h, c, q) fp32  ->  ddt: (b, l, h); dA, ddt_bias partials: (b, c, h)
    pid_b, pid_c = tl.program_id(0), tl.program_id(1)
    offs_h, offs_q, mask, dt_offs, dt_raw = _biased_dt_tile(dt_ptr, dt_bias_ptr, seqlen, nheads, chunk_size,
                                                            stride_dt_b, stride_dt_l, stride_dt_h, HAS_BIAS,
                                                            BLOCK_H, BLOCK_Q)
    dt = dt_raw
    if SOFTPLUS:
        dt = _softplus(dt_raw)
    inside = (dt >= dt_min) & (dt <= dt_max)   # torch.clamp passes the gradient at the bounds
    dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    dt = tl.where(mask, dt, 0.0)

    g_offs = (pid_b * stride_g_b + offs_h[:, None] * stride_g_h + pid_c * stride_g_c
              + offs_q[None, :] * stride_g_q)
    ddA_cumsum = tl.load(ddA_cumsum_ptr + g_offs, mask=mask, other=0.0)
    # dA_cumsum[q] = sum_{s<=q} dA[s]  =>  ddA[s] = sum_{q>=s} ddA_cumsum[q] (reverse cumsum)
    ddA = tl.sum(ddA_cumsum, axis=1)[:, None] - tl.cumsum(ddA_cumsum, axis=1) + ddA_cumsum
    A = tl.load(A_ptr + offs_h, mask=offs_h < nheads, other=0.0).to(tl.float32)
    ddt = tl.load(ddt_out_ptr + g_offs, mask=mask, other=0.0) + ddA * A[:, None]
    dA_part = tl.sum(ddA * dt, axis=1)
    ddt = tl.where(inside & mask, ddt, 0.0)
    if SOFTPLUS:
        ddt = tl.where(dt_raw > 20.0, ddt, ddt * tl.sigmoid(dt_raw))
    tl.store(ddt_ptr + dt_offs, ddt.to(ddt_ptr.dtype.element_ty), mask=mask)
    part_offs = pid_b * stride_part_b + pid_c * stride_part_c + offs_h
    tl.store(dA_part_ptr + part_offs, dA_part, mask=offs_h < nheads)
    if HAS_BIAS:
        tl.store(ddt_bias_part_ptr + part_offs, tl.sum(ddt, axis=1), mask=offs_h < nheads)


def _blocks(launcher, nheads, chunk_size):
    # (heads, tokens) per program: a whole chunk, and as many heads as fit 4096 elements or the
    # launcher's "block_h" setting allows
    block_q = max(16, next_power_of_2(chunk_size))
    cap = launch.SETTINGS.get(launcher, {}).get("block_h", 4096 // block_q)
    block_h = max(1, min(next_power_of_2(nheads), cap))
    return block_h, block_q


def chunk_cumsum_fwd(dt, A, chunk_size, dt_bias=None, dt_softplus=True, dt_limit=(0.0, math.inf)):
    # dt: (b, l, h)  A, dt_bias: (h,)  ->  dt_out, dA_cumsum: (b, h, c, q) fp32
    _, opts = launch.settings("chunk_cumsum_fwd")
    b, l, h = dt.shape
    nchunks = cdiv(l, chunk_size)
    # one allocation for both (host time: each torch call costs microseconds an eager step)
    dt_out, dA_cumsum = torch.empty(2, b, h, nchunks, chunk_size, device=dt.device, dtype=torch.float32).unbind(0)
    block_h, block_q = _blocks("chunk_cumsum_fwd", h, chunk_size)
    grid = (b, nchunks, cdiv(h, block_h))
    _chunk_cumsum_fwd_kernel[grid](
        dt, A, dt_bias, dt_out, dA_cumsum,
        l, h, chunk_size, float(dt_limit[0]), float(dt_limit[1]),
        *dt.stride(), *dt_out.stride(),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, BLOCK_H=block_h, BLOCK_Q=block_q,
        **opts,
    )
    return dt_out, dA_cumsum


def chunk_cumsum_bwd(ddA_cumsum, ddt_out, dt, A, dt_bias=None, dt_softplus=True,
                     dt_limit=(0.0, math.inf)):
    # ddA_cumsum, ddt_out: (b, h, c, q) fp32  dt: (b, l, h)  ->  ddt (like dt), dA (h,), ddt_bias (h,)
    _, opts = launch.settings("chunk_cumsum_bwd")
    b, l, h = dt.shape
    nchunks, chunk_size = ddA_cumsum.shape[2:]
    ddt = torch.empty_like(dt)
    # per (batch, chunk) partials of dA and of ddt_bias, summed by one reduction below
    parts = torch.empty(1 + (dt_bias is not None), b, nchunks, h, device=dt.device, dtype=torch.float32)
    dA_part, ddt_bias_part = parts[0], (parts[1] if dt_bias is not None else None)
    block_h, block_q = _blocks("chunk_cumsum_bwd", h, chunk_size)
    grid = (b, nchunks, cdiv(h, block_h))
    _chunk_cumsum_bwd_kernel[grid](
        ddA_cumsum, ddt_out, dt, A, dt_bias, ddt, dA_part, ddt_bias_part,
        l, h, chunk_size, float(dt_limit[0]), float(dt_limit[1]),
        *dt.stride(), *ddA_cumsum.stride(), dA_part.stride(0), dA_part.stride(1),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, BLOCK_H=block_h, BLOCK_Q=block_q,
        **opts,
    )
    sums = parts.sum(dim=(1, 2))
    # ddt_bias copied out: autograd keeps each returned tensor as a .grad, and two parameters'
    # grads should not share one storage
    return ddt, sums[0], (sums[1].clone() if dt_bias is not None else None)
