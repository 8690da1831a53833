"""Stage 2 of SSD (DESIGN §3): each chunk's final state from its own tokens, started at zero.

    states[c, p, n] = sum_{s in chunk c} exp(dA_cumsum[last] - dA_cumsum[s]) · dt_s · x[s, p] · B[s, n]

(the paper's low-rank "right factor", §6). With seq_idx only tokens of the chunk's last
document count: earlier documents were reset before the chunk ended.

Backward (`chunk_state_bwd_db`) gives dB: the intra-chunk part dCBᵀ·C (dCB from bmm.py)
plus this stage's part scale_s · (x_s · dstates), and this stage's gradient w.r.t. the
decay exponents. Its dx part is folded into chunk_scan's dx kernel (one pass over x).
"""

import torch
import triton
import triton.language as tl

from ..cached_launch import cached_launch
from ..host_math import cdiv
from . import launch
from .tiles import head_program_ids


@triton.jit
def own_state(x_ptr, B_ptr, dt_ptr, dA_cumsum_ptr, seq_idx_ptr, offs_p, offs_n, chunk_len, chunk_size, hdim, dstate,
              stride_x_l, stride_x_p, stride_B_l, stride_B_n, stride_dt_q, stride_seq_l,
              HAS_SEQ: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # a (p block, n block) tile of one chunk's own final state, fp32; x, B and seq_idx point at
    # the chunk's first token, dt and dA_cumsum at its (batch, head, chunk) row. Shared with
    # state_passing's fused forward, which scans these tiles without writing them out.
    dA_last = tl.load(dA_cumsum_ptr + (chunk_len - 1) * stride_dt_q)
    if HAS_SEQ:
        seq_last = tl.load(seq_idx_ptr + (chunk_len - 1) * stride_seq_l)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k in range(0, chunk_size, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        in_chunk = offs_k < chunk_len
        # xᵀ read straight from memory as (p, s): no transpose of a computed tile
        xT = tl.load(x_ptr + offs_p[:, None] * stride_x_p + offs_k[None, :] * stride_x_l,
                     mask=(offs_p[:, None] < hdim) & in_chunk[None, :], other=0.0)
        Bk = tl.load(B_ptr + offs_k[:, None] * stride_B_l + offs_n[None, :] * stride_B_n,
                     mask=in_chunk[:, None] & (offs_n[None, :] < dstate), other=0.0).to(tl.float32)
        dA_k = tl.load(dA_cumsum_ptr + offs_k * stride_dt_q, mask=in_chunk, other=0.0)
        dt_k = tl.load(dt_ptr + offs_k * stride_dt_q, mask=in_chunk, other=0.0)
        keep = in_chunk
        if HAS_SEQ:
            seq_k = tl.load(seq_idx_ptr + offs_k * stride_seq_l, mask=in_chunk, other=-1)
            keep = keep & (seq_k == seq_last)
        scale = tl.where(keep, tl.exp(tl.where(keep, dA_last - dA_k, 0.0)) * dt_k, 0.0)
        acc += tl.dot(xT, (Bk * scale[:, None]).to(xT.dtype))
    return acc


@cached_launch
@triton.jit
def _chunk_state_fwd_kernel(
    x_ptr, B_ptr, dt_ptr, dA_cumsum_ptr, seq_idx_ptr, states_ptr,
    seqlen, nchunks, chunk_size, hdim, dstate, heads_per_group,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_q,
    stride_seq_b, stride_seq_l,
    stride_st_b, stride_st_c, stride_st_h, stride_st_p, stride_st_n,
    HAS_SEQ: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HEADS_FASTEST: tl.constexpr,
):
    # one program per (p block × n block, batch × chunk, head): states[b, c, h, p-block, n-block]
    pid_pn, pid_bc, pid_h = head_program_ids(HEADS_FASTEST)
    pid_b, pid_c = pid_bc // nchunks, pid_bc % nchunks
    num_n = tl.cdiv(dstate, BLOCK_N)
    offs_p = (pid_pn // num_n) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    x_ptr += pid_b * stride_x_b + chunk_start * stride_x_l + pid_h * stride_x_h
    B_ptr += pid_b * stride_B_b + chunk_start * stride_B_l + (pid_h // heads_per_group) * stride_B_g
    dt_ptr += pid_b * stride_dt_b + pid_h * stride_dt_h + pid_c * stride_dt_c
    dA_cumsum_ptr += pid_b * stride_dt_b + pid_h * stride_dt_h + pid_c * stride_dt_c
    if HAS_SEQ:
        seq_idx_ptr += pid_b * stride_seq_b + chunk_start * stride_seq_l
    acc = own_state(x_ptr, B_ptr, dt_ptr, dA_cumsum_ptr, seq_idx_ptr, offs_p, offs_n, chunk_len, chunk_size,
                    hdim, dstate, stride_x_l, stride_x_p, stride_B_l, stride_B_n, stride_dt_q, stride_seq_l,
                    HAS_SEQ, BLOCK_P, BLOCK_N, BLOCK_K)
    states_ptr += pid_b * stride_st_b + pid_c * stride_st_c + pid_h * stride_st_h
    tl.store(states_ptr + offs_p[:, None] * stride_st_p + offs_n[None, :] * stride_st_n, acc,
             mask=(offs_p[:, None] < hdim) & (offs_n[None, :] < dstate))


@cached_launch
@triton.jit
def _chunk_state_bwd_db_kernel(
    x_ptr, B_ptr, C_ptr, dcb_ptr, dstates_ptr, dt_ptr, dA_cumsum_ptr, seq_idx_ptr,
    dB_ptr, ddA_cumsum_ptr,
    seqlen, nchunks, chunk_size, hdim, dstate, heads_per_group, splits, heads_per_split,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_cb_b, stride_cb_c, stride_cb_g, stride_cb_t, stride_cb_s,
    stride_st_b, stride_st_c, stride_st_h, stride_st_p, stride_st_n,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_q,
    stride_seq_b, stride_seq_l, stride_dB_split, stride_dB_b, stride_dB_l, stride_dB_g, stride_dB_n,
    HAS_SEQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_HDIM: tl.constexpr,
):
    # one program per (s block × n block, batch × chunk, group × split of its heads):
    # dB[split, b, s-block, g, n-block]; the first split also adds the intra-chunk part.
    # B and C share strides, dB has its own; dcb: (b, c, g, t, s) fp32 is zero where t < s
    # only inside tiles that bmm.py wrote, so the causal mask is applied again on load.
    pid_mn, pid_bc, pid_gs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pid_g, pid_split = pid_gs // splits, pid_gs % splits
    pid_b, pid_c = pid_bc // nchunks, pid_bc % nchunks
    num_n = tl.cdiv(dstate, BLOCK_N)
    pid_m = pid_mn // num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid_mn % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    m_ok = offs_m < chunk_len
    n_ok = offs_n < dstate
    group_offs = pid_b * stride_B_b + chunk_start * stride_B_l + pid_g * stride_B_g
    B_ptr += group_offs
    C_ptr += group_offs
    dB_ptr += pid_split * stride_dB_split + pid_b * stride_dB_b + chunk_start * stride_dB_l + pid_g * stride_dB_g
    dcb_ptr += pid_b * stride_cb_b + pid_c * stride_cb_c + pid_g * stride_cb_g

    # intra-chunk part: dB[s] += sum_{t>=s} dCB[t, s] · C[t]  (dCBᵀ loaded as (s, t))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(pid_m * BLOCK_M, tl.where(pid_split == 0, chunk_size, 0), BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_ok = offs_k < chunk_len
        dcbT = tl.load(dcb_ptr + offs_m[:, None] * stride_cb_s + offs_k[None, :] * stride_cb_t,
                       mask=m_ok[:, None] & k_ok[None, :] & (offs_k[None, :] >= offs_m[:, None]), other=0.0)
        Ck = tl.load(C_ptr + offs_k[:, None] * stride_B_l + offs_n[None, :] * stride_B_n,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(dcbT.to(Ck.dtype), Ck)

    # chunk-state part, per head of the group: scale_s · sum_p x[s, p] · dstates[p, n]
    B_s = tl.load(B_ptr + offs_m[:, None] * stride_B_l + offs_n[None, :] * stride_B_n,
                  mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    if HAS_SEQ:
        seq_idx_ptr += pid_b * stride_seq_b + chunk_start * stride_seq_l
        seq_last = tl.load(seq_idx_ptr + (chunk_len - 1) * stride_seq_l)
        seq_m = tl.load(seq_idx_ptr + offs_m * stride_seq_l, mask=m_ok, other=-1)
    # a head's whole p in one tile: one tl.dot per head, so the head loop is the innermost loop
    offs_p = tl.arange(0, BLOCK_HDIM)
    p_ok = offs_p < hdim
    first = pid_split * heads_per_split
    for hh in range(first, tl.minimum(first + heads_per_split, heads_per_group)):
        head = pid_g * heads_per_group + hh
        x_h = x_ptr + pid_b * stride_x_b + chunk_start * stride_x_l + head * stride_x_h
        st_h = dstates_ptr + pid_b * stride_st_b + pid_c * stride_st_c + head * stride_st_h
        xs = tl.load(x_h + offs_m[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
                     mask=m_ok[:, None] & p_ok[None, :], other=0.0)
        ds = tl.load(st_h + offs_p[:, None] * stride_st_p + offs_n[None, :] * stride_st_n,
                     mask=p_ok[:, None] & n_ok[None, :], other=0.0)
        acc_h = tl.dot(xs, ds.to(xs.dtype))
        dt_h = dt_ptr + pid_b * stride_dt_b + head * stride_dt_h + pid_c * stride_dt_c
        dA_h = dA_cumsum_ptr + pid_b * stride_dt_b + head * stride_dt_h + pid_c * stride_dt_c
        dA_last = tl.load(dA_h + (chunk_len - 1) * stride_dt_q)
        dA_m = tl.load(dA_h + offs_m * stride_dt_q, mask=m_ok, other=0.0)
        dt_m = tl.load(dt_h + offs_m * stride_dt_q, mask=m_ok, other=0.0)
        keep = m_ok
        if HAS_SEQ:
            keep = keep & (seq_m == seq_last)
        scale = tl.where(keep, tl.exp(tl.where(keep, dA_last - dA_m, 0.0)) * dt_m, 0.0)
        acc_h *= scale[:, None]
        acc += acc_h
        # d states / d(dA_last - dA_cumsum[s]) = B[s] · acc_h[s]
        term = tl.sum(acc_h * B_s, axis=1)
        ddA_h = ddA_cumsum_ptr + pid_b * stride_dt_b + head * stride_dt_h + pid_c * stride_dt_c
        tl.atomic_add(ddA_h + offs_m * stride_dt_q, -term, mask=m_ok, sem="relaxed")
        tl.atomic_add(ddA_h + (chunk_len - 1) * stride_dt_q, tl.sum(term, axis=0), sem="relaxed")
    tl.store(dB_ptr + offs_m[:, None] * stride_dB_l + offs_n[None, :] * stride_dB_n,
             acc.to(dB_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def chunk_state_fwd(B, x, dt, dA_cumsum, seq_idx=None):
    # B: (b, l, g, n)  x: (b, l, h, p)  dt, dA_cumsum: (b, h, c, q)  ->  states: (b, c, h, p, n) fp32
    tile, opts = launch.settings("chunk_state_fwd", x.dtype)
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    nchunks, chunk_size = dt.shape[2:]
    states = torch.empty(b, nchunks, h, p, n, device=x.device, dtype=torch.float32)
    block_p, block_k = launch.block(p, tile), launch.block(chunk_size, tile)
    block_n = launch.dstate_block("chunk_state_fwd", n, x.dtype)
    grid, heads_fastest = launch.head_grid("chunk_state_fwd", cdiv(p, block_p) * cdiv(n, block_n), b * nchunks, h)
    _chunk_state_fwd_kernel[grid](
        x, B, dt, dA_cumsum, seq_idx, states,
        l, nchunks, chunk_size, p, n, h // g,
        *x.stride(), *B.stride(), *dt.stride(),
        *launch.seq_strides(seq_idx), *states.stride(),
        HAS_SEQ=seq_idx is not None, BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_K=block_k,
        HEADS_FASTEST=heads_fastest, **opts,
    )
    return states


def chunk_state_bwd_db(x, B, C, dcb, dstates, dt, dA_cumsum, ddA_cumsum, seq_idx=None, out=None):
    # x: (b, l, h, p)  B, C: (b, l, g, n)  dcb: (b, c, g, q, q)  dstates: (b, c, h, p, n)
    # dt, dA_cumsum, ddA_cumsum: (b, h, c, q), ddA_cumsum accumulated in place  ->  dB like B,
    # written into `out` (B's shape and dtype, any strides) where given
    tile, opts = launch.settings("chunk_state_bwd_db", x.dtype)
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    nchunks, chunk_size = dt.shape[2:]
    block_m = block_k = launch.block(chunk_size, tile)
    block_n = launch.dstate_block("chunk_state_bwd_db", n, x.dtype)
    tiles = cdiv(chunk_size, block_m) * cdiv(n, block_n)
    unsplit_programs = tiles * b * nchunks * g
    dB, splits, heads_per_split = launch.group_grad_output("chunk_state_bwd_db", B, C, h // g, unsplit_programs, out)
    grid = (tiles, b * nchunks, g * splits)
    _chunk_state_bwd_db_kernel[grid](
        x, B, C, dcb, dstates, dt, dA_cumsum, seq_idx, dB, ddA_cumsum,
        l, nchunks, chunk_size, p, n, h // g, splits, heads_per_split,
        *x.stride(), *B.stride(), *dcb.stride(), *dstates.stride(), *dt.stride(),
        *launch.seq_strides(seq_idx), *dB.stride(),
        HAS_SEQ=seq_idx is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_HDIM=launch.whole(p),
        **opts,
    )
    return launch.sum_splits(dB, B.dtype, out)
