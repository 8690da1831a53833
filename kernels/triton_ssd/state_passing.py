"""Stage 3 of SSD (DESIGN §3): the sequential scan over chunks (the paper's "middle factor", §6).

    S_{-1} = initial_states,   S_c = a_c · S_{c-1} + states_c,   a_c = exp(dA_cumsum_c[last])

states_in[c] = S_{c-1} is the state entering chunk c, and S_{last} the final state. Where
the document of chunk c's last token differs from that of chunk c-1's last token (for
c = 0: from seq_idx[:, 0]), a document started inside chunk c and a_c is 0.

Backward, with G_c the gradient of S_c (G_last = d final):
    dstates_c = G_c,   d a_c = <G_c, S_{c-1}>,   G_{c-1} = dstates_in[c] + a_c · G_c,
    d initial_states = G_{-1}.
"""

import torch
import triton
import triton.language as tl

from ..cached_launch import cached_launch
from ..host_math import cdiv, next_power_of_2
from . import launch


@triton.jit
def _chunk_decay(dA_cumsum_ptr, seq_idx_ptr, c, seqlen, chunk_size, stride_dA_c, stride_dA_q,
                 stride_seq_l, seq_prev, HAS_SEQ: tl.constexpr):
    # a_c and the document of chunk c's last token
    last = tl.minimum(chunk_size, seqlen - c * chunk_size) - 1
    a = tl.exp(tl.load(dA_cumsum_ptr + c * stride_dA_c + last * stride_dA_q))
    seq_new = seq_prev
    if HAS_SEQ:
        seq_new = tl.load(seq_idx_ptr + (c * chunk_size + last) * stride_seq_l)
        a = tl.where(seq_new == seq_prev, a, 0.0)
    return a, seq_new


@cached_launch
@triton.jit
def _state_passing_fwd_kernel(
    states_ptr, dA_cumsum_ptr, init_ptr, seq_idx_ptr, states_in_ptr, final_ptr,
    dim, nchunks, seqlen, chunk_size,
    stride_st_b, stride_st_c, stride_st_h,
    stride_dA_b, stride_dA_h, stride_dA_c, stride_dA_q,
    stride_init_b, stride_init_h,
    stride_seq_b, stride_seq_l,
    HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK: tl.constexpr,
):
    # states: (b, c, h, p·n) fp32 (p·n contiguous); states_in likewise, in fp32 or in the dtype
    # chunk_scan_fwd casts it to anyway (backward reads the same)  init, final: (b, h, p·n)
    pid_d, pid_b, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = pid_d * BLOCK + tl.arange(0, BLOCK)
    ok = offs < dim
    states_ptr += pid_b * stride_st_b + pid_h * stride_st_h + offs
    states_in_ptr += pid_b * stride_st_b + pid_h * stride_st_h + offs
    dA_cumsum_ptr += pid_b * stride_dA_b + pid_h * stride_dA_h
    if HAS_SEQ:
        seq_idx_ptr += pid_b * stride_seq_b
    if HAS_INIT:
        carried = tl.load(init_ptr + pid_b * stride_init_b + pid_h * stride_init_h + offs,
                          mask=ok, other=0.0).to(tl.float32)
    else:
        carried = tl.zeros((BLOCK,), dtype=tl.float32)
    seq_prev = 0
    if HAS_SEQ:
        seq_prev = tl.load(seq_idx_ptr)
    for c in range(nchunks):
        tl.store(states_in_ptr + c * stride_st_c, carried.to(states_in_ptr.dtype.element_ty), mask=ok)
        a, seq_prev = _chunk_decay(dA_cumsum_ptr, seq_idx_ptr, c, seqlen, chunk_size, stride_dA_c,
                                   stride_dA_q, stride_seq_l, seq_prev, HAS_SEQ)
        carried = a * carried + tl.load(states_ptr + c * stride_st_c, mask=ok, other=0.0)
    tl.store(final_ptr + pid_b * stride_init_b + pid_h * stride_init_h + offs, carried, mask=ok)


@cached_launch
@triton.jit
def _state_passing_bwd_kernel(
    dstates_in_ptr, states_in_ptr, dA_cumsum_ptr, dfinal_ptr, seq_idx_ptr,
    dstates_ptr, dinit_ptr, ddA_cumsum_ptr,
    dim, nchunks, seqlen, chunk_size,
    stride_st_b, stride_st_c, stride_st_h,
    stride_dA_b, stride_dA_h, stride_dA_c, stride_dA_q,
    stride_init_b, stride_init_h,
    stride_seq_b, stride_seq_l,
    HAS_DFINAL: tl.constexpr, HAS_DINIT: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK: tl.constexpr,
):
    # dstates_in: (b, c, h, p·n) fp32; states_in and dstates likewise in fp32 or the forward's
    # narrower dtype (the recurrence itself runs in fp32); ddA_cumsum (b, h, c, q) gets d a_c · a_c
    # at each chunk's last token (atomically: the p·n blocks of one head share it)
    pid_d, pid_b, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = pid_d * BLOCK + tl.arange(0, BLOCK)
    ok = offs < dim
    head_offs = pid_b * stride_st_b + pid_h * stride_st_h + offs
    dA_cumsum_ptr += pid_b * stride_dA_b + pid_h * stride_dA_h
    ddA_cumsum_ptr += pid_b * stride_dA_b + pid_h * stride_dA_h
    if HAS_SEQ:
        seq_idx_ptr += pid_b * stride_seq_b
    if HAS_DFINAL:
        grad = tl.load(dfinal_ptr + pid_b * stride_init_b + pid_h * stride_init_h + offs,
                       mask=ok, other=0.0).to(tl.float32)
    else:
        grad = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i
        tl.store(dstates_ptr + head_offs + c * stride_st_c, grad, mask=ok)
        seq_prev = 0
        if HAS_SEQ:
            # document of the token before chunk c (for c = 0, the first document)
            seq_prev = tl.load(seq_idx_ptr + tl.maximum(c * chunk_size - 1, 0) * stride_seq_l)
        a, _ = _chunk_decay(dA_cumsum_ptr, seq_idx_ptr, c, seqlen, chunk_size, stride_dA_c,
                            stride_dA_q, stride_seq_l, seq_prev, HAS_SEQ)
        carried_in = tl.load(states_in_ptr + head_offs + c * stride_st_c, mask=ok, other=0.0)
        da = tl.sum(grad * carried_in, axis=0)
        last = tl.minimum(chunk_size, seqlen - c * chunk_size) - 1
        tl.atomic_add(ddA_cumsum_ptr + c * stride_dA_c + last * stride_dA_q, da * a, sem="relaxed")
        grad = tl.load(dstates_in_ptr + head_offs + c * stride_st_c, mask=ok, other=0.0) + a * grad
    if HAS_DINIT:
        tl.store(dinit_ptr + pid_b * stride_init_b + pid_h * stride_init_h + offs, grad, mask=ok)


_BLOCK = 1024


def state_passing_fwd(states, dA_cumsum, seqlen, initial_states=None, seq_idx=None, states_in_dtype=torch.float32):
    # states: (b, c, h, p, n) fp32  dA_cumsum: (b, h, c, q)  initial_states: (b, h, p, n)
    # ->  states_in: (b, c, h, p, n) in states_in_dtype, final_states: (b, h, p, n) fp32
    _, opts = launch.settings("state_passing_fwd")
    b, nchunks, h, p, n = states.shape
    chunk_size = dA_cumsum.shape[-1]
    states_in = torch.empty_like(states, dtype=states_in_dtype)
    final = torch.empty(b, h, p, n, device=states.device, dtype=torch.float32)
    if initial_states is not None:
        initial_states = initial_states.contiguous()
    block = min(_BLOCK, next_power_of_2(p * n))
    grid = (cdiv(p * n, block), b, h)
    _state_passing_fwd_kernel[grid](
        states, dA_cumsum, initial_states, seq_idx, states_in, final,
        p * n, nchunks, seqlen, chunk_size,
        states.stride(0), states.stride(1), states.stride(2), *dA_cumsum.stride(),
        final.stride(0), final.stride(1),
        *(seq_idx.stride() if seq_idx is not None else (0, 0)),
        HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None, BLOCK=block,
        **opts,
    )
    return states_in, final


def state_passing_bwd(dstates_in, states_in, dA_cumsum, ddA_cumsum, seqlen, dfinal=None,
                      seq_idx=None, need_dinit=False):
    # dstates_in: (b, c, h, p, n) fp32  states_in: likewise, fp32 or the forward's narrower dtype
    # dfinal: (b, h, p, n)  ->  dstates (gradient of each chunk's own state): (b, c, h, p, n) in
    # states_in's dtype (its readers cast it to that for their dots), dinit (b, h, p, n) fp32 or None
    _, opts = launch.settings("state_passing_bwd")
    b, nchunks, h, p, n = states_in.shape
    chunk_size = dA_cumsum.shape[-1]
    dstates = torch.empty_like(states_in)
    dinit = torch.empty(b, h, p, n, device=states_in.device, dtype=torch.float32) if need_dinit else None
    if dfinal is not None:
        dfinal = dfinal.contiguous()
    block = min(_BLOCK, next_power_of_2(p * n))
    grid = (cdiv(p * n, block), b, h)
    _state_passing_bwd_kernel[grid](
        dstates_in, states_in, dA_cumsum, dfinal, seq_idx, dstates, dinit, ddA_cumsum,
        p * n, nchunks, seqlen, chunk_size,
        states_in.stride(0), states_in.stride(1), states_in.stride(2), *dA_cumsum.stride(),
        h * p * n, p * n,
        *(seq_idx.stride() if seq_idx is not None else (0, 0)),
        HAS_DFINAL=dfinal is not None, HAS_DINIT=need_dinit, HAS_SEQ=seq_idx is not None, BLOCK=block,
        **opts,
    )
    return dstates, dinit
