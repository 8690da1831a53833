"""Stage 4b of SSD (DESIGN §3): the output of each chunk (paper §6):

    y[t] = sum_{s<=t} CB[t, s] · exp(dA_cumsum[t] - dA_cumsum[s]) · dt_s · x[s]     (diagonal block)
         + exp(dA_cumsum[t]) · C[t] · states_inᵀ                                    (off-diagonal)
         + D · x[t],        then y[t] *= silu(z[t]) if z is given.

With seq_idx, the diagonal block keeps only pairs of one document, and the carried state
reaches only tokens of the document of the token before the chunk.

Backward kernels, all reading dy after the gate (`gate_bwd` makes it, with dz):
  * `chunk_scan_bwd_dstates`: d states_in[c] = sum_t exp(dA_cumsum[t]) · dy[t]ᵀ C[t]
  * `chunk_scan_bwd_dx`: dx from the diagonal block and from chunk_state (whose dx part
    lives here so that x and dx are read and written once), plus D·dy; also ddt and dD.
  * `chunk_scan_bwd_dc`: dC = dCB·B + exp(dA_cumsum[t]) · dy[t] · states_in, and the
    off-diagonal gradient w.r.t. dA_cumsum[t], which is dy[t]·y_offdiag[t].
"""

import torch
import triton
import triton.language as tl

from ..cached_launch import cached_launch
from ..host_math import cdiv
from . import launch
from .tiles import cb_tile, head_program_ids


@cached_launch
@triton.jit
def _chunk_scan_fwd_kernel(
    cb_ptr, x_ptr, z_ptr, dt_ptr, dA_cumsum_ptr, C_ptr, states_in_ptr, D_ptr, seq_idx_ptr,
    y_ptr, y_pregate_ptr,
    seqlen, nchunks, chunk_size, hdim, dstate, heads_per_group,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_cb_b, stride_cb_c, stride_cb_g, stride_cb_t, stride_cb_s,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_q,
    stride_st_b, stride_st_c, stride_st_h, stride_st_p, stride_st_n,
    stride_seq_b, stride_seq_l, stride_D_h,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
    FACTOR_DECAY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DSTATE: tl.constexpr,
    HEADS_FASTEST: tl.constexpr,
):
    # one program per (t block × p block, batch × chunk, head); x, z, y, y_pregate share strides
    pid_mn, pid_bc, pid_h = head_program_ids(HEADS_FASTEST)
    pid_b, pid_c = pid_bc // nchunks, pid_bc % nchunks
    num_n = tl.cdiv(hdim, BLOCK_N)
    pid_m = pid_mn // num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid_mn % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    m_ok = offs_m < chunk_len
    n_ok = offs_n < hdim
    pid_g = pid_h // heads_per_group
    x_head = pid_b * stride_x_b + chunk_start * stride_x_l + pid_h * stride_x_h
    C_ptr += pid_b * stride_C_b + chunk_start * stride_C_l + pid_g * stride_C_g
    cb_ptr += pid_b * stride_cb_b + pid_c * stride_cb_c + pid_g * stride_cb_g
    dt_ptr += pid_b * stride_dt_b + pid_h * stride_dt_h + pid_c * stride_dt_c
    dA_cumsum_ptr += pid_b * stride_dt_b + pid_h * stride_dt_h + pid_c * stride_dt_c
    states_in_ptr += pid_b * stride_st_b + pid_c * stride_st_c + pid_h * stride_st_h
    dA_m = tl.load(dA_cumsum_ptr + offs_m * stride_dt_q, mask=m_ok, other=0.0)

    # off-diagonal: exp(dA_cumsum[t]) · C[t] · states_inᵀ (states_inᵀ read as (n, p))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, dstate, BLOCK_DSTATE):
        offs_k = k + tl.arange(0, BLOCK_DSTATE)
        Ct = tl.load(C_ptr + offs_m[:, None] * stride_C_l + offs_k[None, :] * stride_C_n,
                     mask=m_ok[:, None] & (offs_k[None, :] < dstate), other=0.0)
        stT = tl.load(states_in_ptr + offs_k[:, None] * stride_st_n + offs_n[None, :] * stride_st_p,
                      mask=(offs_k[:, None] < dstate) & n_ok[None, :], other=0.0)
        acc += tl.dot(Ct, stT.to(Ct.dtype))
    state_decay = tl.exp(dA_m)
    if HAS_SEQ:
        seq_idx_ptr += pid_b * stride_seq_b
        seq_before = tl.load(seq_idx_ptr + tl.maximum(chunk_start - 1, 0) * stride_seq_l)
        seq_m = tl.load(seq_idx_ptr + (chunk_start + offs_m) * stride_seq_l, mask=m_ok, other=-1)
        state_decay = tl.where(seq_m == seq_before, state_decay, 0.0)
    acc *= state_decay[:, None]

    # diagonal block: sum_{s<=t} CB[t, s] · exp(dA_cumsum[t] - dA_cumsum[s]) · dt_s · x[s].
    # First the source tiles wholly before this row tile, with the decay factored through the
    # row tile's first token (combined.py: factored decay), then the tiles that reach the diagonal.
    row0 = pid_m * BLOCK_M
    lo = 0
    if FACTOR_DECAY:
        lo = (row0 // BLOCK_K) * BLOCK_K
        dA_ref = tl.load(dA_cumsum_ptr + tl.minimum(row0, chunk_len - 1) * stride_dt_q)
        decay_m = tl.exp(dA_m - dA_ref)
        for k in range(0, lo, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            k_ok = offs_k < chunk_len
            cb = cb_tile(cb_ptr, offs_m, offs_k, stride_cb_t, stride_cb_s, chunk_size)
            dA_k = tl.load(dA_cumsum_ptr + offs_k * stride_dt_q, mask=k_ok, other=0.0)
            dt_k = tl.load(dt_ptr + offs_k * stride_dt_q, mask=k_ok, other=0.0)
            keep = m_ok[:, None] & k_ok[None, :]
            if HAS_SEQ:
                seq_k = tl.load(seq_idx_ptr + (chunk_start + offs_k) * stride_seq_l, mask=k_ok, other=-2)
                keep = keep & (seq_m[:, None] == seq_k[None, :])
            scores = tl.where(keep, cb * decay_m[:, None] * (tl.exp(dA_ref - dA_k) * dt_k)[None, :], 0.0)
            xk = tl.load(x_ptr + x_head + offs_k[:, None] * stride_x_l + offs_n[None, :] * stride_x_p,
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(scores.to(xk.dtype), xk)
    # the tiles that reach the diagonal (all tiles without FACTOR_DECAY): the exact exp, masked
    hi = row0 + BLOCK_M   # loop bounds stay scalar: masks handle the short last chunk
    for k in range(lo, hi, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_ok = offs_k < chunk_len
        keep = m_ok[:, None] & k_ok[None, :] & (offs_m[:, None] >= offs_k[None, :])
        if HAS_SEQ:
            seq_k = tl.load(seq_idx_ptr + (chunk_start + offs_k) * stride_seq_l, mask=k_ok, other=-2)
            keep = keep & (seq_m[:, None] == seq_k[None, :])
        cb = cb_tile(cb_ptr, offs_m, offs_k, stride_cb_t, stride_cb_s, chunk_size)
        dA_k = tl.load(dA_cumsum_ptr + offs_k * stride_dt_q, mask=k_ok, other=0.0)
        dt_k = tl.load(dt_ptr + offs_k * stride_dt_q, mask=k_ok, other=0.0)
        # the select also drops the exp's overflow above the diagonal
        scores = tl.where(keep, cb * tl.exp(dA_m[:, None] - dA_k[None, :]) * dt_k[None, :], 0.0)
        xk = tl.load(x_ptr + x_head + offs_k[:, None] * stride_x_l + offs_n[None, :] * stride_x_p,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(scores.to(xk.dtype), xk)

    out_offs = x_head + offs_m[:, None] * stride_x_l + offs_n[None, :] * stride_x_p
    out_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_D:
        if D_PER_CHANNEL:
            D = tl.load(D_ptr + pid_h * stride_D_h + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        else:
            D = tl.load(D_ptr + pid_h * stride_D_h).to(tl.float32)
        x_m = tl.load(x_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
        acc += x_m * D
    if HAS_Z:
        tl.store(y_pregate_ptr + out_offs, acc.to(y_pregate_ptr.dtype.element_ty), mask=out_mask)
        z = tl.load(z_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
        acc *= z * tl.sigmoid(z)
    tl.store(y_ptr + out_offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@cached_launch
@triton.jit
def _gate_bwd_kernel(dout_ptr, z_ptr, y_pregate_ptr, dy_ptr, dz_ptr, numel, BLOCK: tl.constexpr):
    # out = y·silu(z): dy = dout·silu(z), dz = dout·y·silu'(z); all contiguous, same shape
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    dout = tl.load(dout_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(y_pregate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(z)
    tl.store(dy_ptr + offs, (dout * z * sig).to(dy_ptr.dtype.element_ty), mask=ok)
    tl.store(dz_ptr + offs, (dout * y * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty), mask=ok)


@triton.jit
def own_dstates_in(dy_ptr, C_ptr, dA_cumsum_ptr, seq_idx_ptr, seq_before, offs_p, offs_n, chunk_len, chunk_size,
                   hdim, dstate, stride_x_l, stride_x_p, stride_C_l, stride_C_n, stride_dt_q, stride_seq_l,
                   HAS_SEQ: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # a (p block, n block) tile of d states_in of one chunk through its own y, fp32: dy, C and
    # seq_idx point at the chunk's first token, dA_cumsum at its (batch, head, chunk) row;
    # seq_before is the document of the token before the chunk. Shared with state_passing's
    # fused backward, which passes these tiles back without writing them out.
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k in range(0, chunk_size, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_ok = offs_k < chunk_len
        dyT = tl.load(dy_ptr + offs_p[:, None] * stride_x_p + offs_k[None, :] * stride_x_l,
                      mask=(offs_p[:, None] < hdim) & k_ok[None, :], other=0.0)
        Ck = tl.load(C_ptr + offs_k[:, None] * stride_C_l + offs_n[None, :] * stride_C_n,
                     mask=k_ok[:, None] & (offs_n[None, :] < dstate), other=0.0).to(tl.float32)
        keep = k_ok
        if HAS_SEQ:
            seq_k = tl.load(seq_idx_ptr + offs_k * stride_seq_l, mask=k_ok, other=-1)
            keep = keep & (seq_k == seq_before)
        dA_k = tl.load(dA_cumsum_ptr + offs_k * stride_dt_q, mask=k_ok, other=0.0)
        decay = tl.where(keep, tl.exp(tl.where(keep, dA_k, 0.0)), 0.0)
        acc += tl.dot(dyT, (Ck * decay[:, None]).to(dyT.dtype))
    return acc


@cached_launch
@triton.jit
def _chunk_scan_bwd_dstates_kernel(
    dy_ptr, C_ptr, dA_cumsum_ptr, seq_idx_ptr, dstates_in_ptr,
    seqlen, nchunks, chunk_size, hdim, dstate, heads_per_group,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_q,
    stride_st_b, stride_st_c, stride_st_h, stride_st_p, stride_st_n,
    stride_seq_b, stride_seq_l,
    HAS_SEQ: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HEADS_FASTEST: tl.constexpr,
):
    # one program per (p block × n block, batch × chunk, head): d states_in[b, c, h]
    pid_pn, pid_bc, pid_h = head_program_ids(HEADS_FASTEST)
    pid_b, pid_c = pid_bc // nchunks, pid_bc % nchunks
    num_n = tl.cdiv(dstate, BLOCK_N)
    offs_p = (pid_pn // num_n) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    dy_ptr += pid_b * stride_x_b + chunk_start * stride_x_l + pid_h * stride_x_h
    C_ptr += pid_b * stride_C_b + chunk_start * stride_C_l + (pid_h // heads_per_group) * stride_C_g
    dA_cumsum_ptr += pid_b * stride_dt_b + pid_h * stride_dt_h + pid_c * stride_dt_c
    seq_before = 0
    if HAS_SEQ:
        seq_idx_ptr += pid_b * stride_seq_b
        seq_before = tl.load(seq_idx_ptr + tl.maximum(chunk_start - 1, 0) * stride_seq_l)
        seq_idx_ptr += chunk_start * stride_seq_l
    acc = own_dstates_in(dy_ptr, C_ptr, dA_cumsum_ptr, seq_idx_ptr, seq_before, offs_p, offs_n, chunk_len, chunk_size,
                         hdim, dstate, stride_x_l, stride_x_p, stride_C_l, stride_C_n, stride_dt_q, stride_seq_l,
                         HAS_SEQ, BLOCK_P, BLOCK_N, BLOCK_K)
    dstates_in_ptr += pid_b * stride_st_b + pid_c * stride_st_c + pid_h * stride_st_h
    tl.store(dstates_in_ptr + offs_p[:, None] * stride_st_p + offs_n[None, :] * stride_st_n, acc,
             mask=(offs_p[:, None] < hdim) & (offs_n[None, :] < dstate))


@cached_launch
@triton.jit
def _chunk_scan_bwd_dx_kernel(
    cb_ptr, dy_ptr, x_ptr, B_ptr, dstates_ptr, dt_ptr, dA_cumsum_ptr, D_ptr, seq_idx_ptr,
    dx_ptr, ddt_ptr, dD_ptr,
    seqlen, nchunks, chunk_size, hdim, dstate, heads_per_group,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_cb_b, stride_cb_c, stride_cb_g, stride_cb_t, stride_cb_s,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_q,
    stride_st_b, stride_st_c, stride_st_h, stride_st_p, stride_st_n,
    stride_seq_b, stride_seq_l, stride_D_h,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_SEQ: tl.constexpr, FACTOR_DECAY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DSTATE: tl.constexpr,
    HEADS_FASTEST: tl.constexpr,
):
    # one program per (s block × p block, batch × chunk, head); dy, x, dx share strides.
    # ddt (b, h, c, q) and dD (h, p) fp32 are accumulated atomically (p blocks share them).
    pid_mn, pid_bc, pid_h = head_program_ids(HEADS_FASTEST)
    pid_b, pid_c = pid_bc // nchunks, pid_bc % nchunks
    num_n = tl.cdiv(hdim, BLOCK_N)
    pid_m = pid_mn // num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # source tokens s
    offs_n = (pid_mn % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    m_ok = offs_m < chunk_len
    n_ok = offs_n < hdim
    pid_g = pid_h // heads_per_group
    x_head = pid_b * stride_x_b + chunk_start * stride_x_l + pid_h * stride_x_h
    B_ptr += pid_b * stride_B_b + chunk_start * stride_B_l + pid_g * stride_B_g
    cb_ptr += pid_b * stride_cb_b + pid_c * stride_cb_c + pid_g * stride_cb_g
    dt_ptr += pid_b * stride_dt_b + pid_h * stride_dt_h + pid_c * stride_dt_c
    dA_cumsum_ptr += pid_b * stride_dt_b + pid_h * stride_dt_h + pid_c * stride_dt_c
    dstates_ptr += pid_b * stride_st_b + pid_c * stride_st_c + pid_h * stride_st_h
    dA_m = tl.load(dA_cumsum_ptr + offs_m * stride_dt_q, mask=m_ok, other=0.0)
    dA_last = tl.load(dA_cumsum_ptr + (chunk_len - 1) * stride_dt_q)
    if HAS_SEQ:
        seq_idx_ptr += pid_b * stride_seq_b + chunk_start * stride_seq_l
        seq_m = tl.load(seq_idx_ptr + offs_m * stride_seq_l, mask=m_ok, other=-1)
        seq_last = tl.load(seq_idx_ptr + (chunk_len - 1) * stride_seq_l)

    # chunk_state's part: exp(dA_last - dA_cumsum[s]) · B[s] · dstatesᵀ (dstatesᵀ read as (n, p))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, dstate, BLOCK_DSTATE):
        offs_k = k + tl.arange(0, BLOCK_DSTATE)
        Bs = tl.load(B_ptr + offs_m[:, None] * stride_B_l + offs_k[None, :] * stride_B_n,
                     mask=m_ok[:, None] & (offs_k[None, :] < dstate), other=0.0)
        dsT = tl.load(dstates_ptr + offs_k[:, None] * stride_st_n + offs_n[None, :] * stride_st_p,
                      mask=(offs_k[:, None] < dstate) & n_ok[None, :], other=0.0)
        acc += tl.dot(Bs, dsT.to(Bs.dtype))
    keep_m = m_ok
    if HAS_SEQ:
        keep_m = keep_m & (seq_m == seq_last)
    acc *= tl.where(keep_m, tl.exp(tl.where(keep_m, dA_last - dA_m, 0.0)), 0.0)[:, None]

    # diagonal block: sum_{t>=s} CB[t, s] · exp(dA_cumsum[t] - dA_cumsum[s]) · dy[t] (CBᵀ read as (s, t)).
    # First the target tiles that reach the diagonal (all of them without FACTOR_DECAY): the
    # exact exp, masked; then those wholly after this row tile, with the decay factored through
    # the row tile's last token (combined.py: factored decay).
    row0 = pid_m * BLOCK_M
    band_end = chunk_size
    if FACTOR_DECAY:
        band_end = tl.minimum(row0 + tl.cdiv(BLOCK_M, BLOCK_K) * BLOCK_K, chunk_size)   # whole steps from row0
    for k in range(row0, band_end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_ok = offs_k < chunk_len
        keep = m_ok[:, None] & k_ok[None, :] & (offs_k[None, :] >= offs_m[:, None])
        if HAS_SEQ:
            seq_k = tl.load(seq_idx_ptr + offs_k * stride_seq_l, mask=k_ok, other=-2)
            keep = keep & (seq_m[:, None] == seq_k[None, :])
        cbT = cb_tile(cb_ptr, offs_m, offs_k, stride_cb_s, stride_cb_t, chunk_size)
        dA_k = tl.load(dA_cumsum_ptr + offs_k * stride_dt_q, mask=k_ok, other=0.0)
        w = tl.where(keep, cbT * tl.exp(dA_k[None, :] - dA_m[:, None]), 0.0)
        dyk = tl.load(dy_ptr + x_head + offs_k[:, None] * stride_x_l + offs_n[None, :] * stride_x_p,
                      mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(w.to(dyk.dtype), dyk)
    if FACTOR_DECAY:
        dA_ref = tl.load(dA_cumsum_ptr + (tl.minimum(row0 + BLOCK_M, chunk_len) - 1) * stride_dt_q)
        decay_m = tl.exp(dA_ref - dA_m)
        for k in range(band_end, chunk_size, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            k_ok = offs_k < chunk_len
            cbT = cb_tile(cb_ptr, offs_m, offs_k, stride_cb_s, stride_cb_t, chunk_size)
            dA_k = tl.load(dA_cumsum_ptr + offs_k * stride_dt_q, mask=k_ok, other=0.0)
            # the select also drops CB's padding rows (targets past the chunk's end)
            keep = m_ok[:, None] & k_ok[None, :]
            if HAS_SEQ:
                seq_k = tl.load(seq_idx_ptr + offs_k * stride_seq_l, mask=k_ok, other=-2)
                keep = keep & (seq_m[:, None] == seq_k[None, :])
            w = tl.where(keep, cbT * decay_m[:, None] * tl.exp(dA_k - dA_ref)[None, :], 0.0)
            dyk = tl.load(dy_ptr + x_head + offs_k[:, None] * stride_x_l + offs_n[None, :] * stride_x_p,
                          mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(w.to(dyk.dtype), dyk)

    # acc = d y / d(dt_s · x[s]); so dx = dt_s · acc and ddt_s = sum_p x[s, p] · acc[s, p]
    out_offs = x_head + offs_m[:, None] * stride_x_l + offs_n[None, :] * stride_x_p
    out_mask = m_ok[:, None] & n_ok[None, :]
    x_m = tl.load(x_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
    dt_m = tl.load(dt_ptr + offs_m * stride_dt_q, mask=m_ok, other=0.0)
    ddt_ptr += pid_b * stride_dt_b + pid_h * stride_dt_h + pid_c * stride_dt_c
    tl.atomic_add(ddt_ptr + offs_m * stride_dt_q, tl.sum(acc * x_m, axis=1), mask=m_ok, sem="relaxed")
    dx = acc * dt_m[:, None]
    if HAS_D:
        dy_m = tl.load(dy_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
        if D_PER_CHANNEL:
            D = tl.load(D_ptr + pid_h * stride_D_h + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        else:
            D = tl.load(D_ptr + pid_h * stride_D_h).to(tl.float32)
        dx += dy_m * D
        tl.atomic_add(dD_ptr + pid_h * hdim + offs_n, tl.sum(dy_m * x_m, axis=0), mask=n_ok, sem="relaxed")
    tl.store(dx_ptr + out_offs, dx.to(dx_ptr.dtype.element_ty), mask=out_mask)


@cached_launch
@triton.jit
def _chunk_scan_bwd_dc_kernel(
    dcb_ptr, B_ptr, C_ptr, dy_ptr, states_in_ptr, dA_cumsum_ptr, seq_idx_ptr, dC_ptr, ddA_cumsum_ptr,
    seqlen, nchunks, chunk_size, hdim, dstate, heads_per_group, splits, heads_per_split,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_cb_b, stride_cb_c, stride_cb_g, stride_cb_t, stride_cb_s,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_q,
    stride_st_b, stride_st_c, stride_st_h, stride_st_p, stride_st_n,
    stride_seq_b, stride_seq_l, stride_dC_split, stride_dC_b, stride_dC_l, stride_dC_g, stride_dC_n,
    HAS_SEQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_HDIM: tl.constexpr,
):
    # one program per (t block × n block, batch × chunk, group × split of its heads); B, C and
    # each split's dC share strides. The first split also adds the diagonal block.
    pid_mn, pid_bc, pid_gs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pid_g, pid_split = pid_gs // splits, pid_gs % splits
    pid_b, pid_c = pid_bc // nchunks, pid_bc % nchunks
    num_n = tl.cdiv(dstate, BLOCK_N)
    pid_m = pid_mn // num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # target tokens t
    offs_n = (pid_mn % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    m_ok = offs_m < chunk_len
    n_ok = offs_n < dstate
    group_offs = pid_b * stride_B_b + chunk_start * stride_B_l + pid_g * stride_B_g
    dcb_ptr += pid_b * stride_cb_b + pid_c * stride_cb_c + pid_g * stride_cb_g

    # diagonal block: dC[t] += sum_{s<=t} dCB[t, s] · B[s]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # loop bounds stay scalar: masks handle the short last chunk; other splits skip the loop
    hi = tl.where(pid_split == 0, (pid_m + 1) * BLOCK_M, 0)
    for k in range(0, hi, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_ok = offs_k < chunk_len
        dcb = tl.load(dcb_ptr + offs_m[:, None] * stride_cb_t + offs_k[None, :] * stride_cb_s,
                      mask=m_ok[:, None] & k_ok[None, :] & (offs_m[:, None] >= offs_k[None, :]), other=0.0)
        Bk = tl.load(B_ptr + group_offs + offs_k[:, None] * stride_B_l + offs_n[None, :] * stride_B_n,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(dcb.to(Bk.dtype), Bk)

    # off-diagonal, per head of the group: exp(dA_cumsum[t]) · dy[t] · states_in
    C_t = tl.load(C_ptr + group_offs + offs_m[:, None] * stride_B_l + offs_n[None, :] * stride_B_n,
                  mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    keep = m_ok
    if HAS_SEQ:
        seq_idx_ptr += pid_b * stride_seq_b
        seq_before = tl.load(seq_idx_ptr + tl.maximum(chunk_start - 1, 0) * stride_seq_l)
        seq_m = tl.load(seq_idx_ptr + (chunk_start + offs_m) * stride_seq_l, mask=m_ok, other=-1)
        keep = keep & (seq_m == seq_before)
    # a head's whole p in one tile: one tl.dot per head, so the head loop is the innermost loop
    offs_p = tl.arange(0, BLOCK_HDIM)
    p_ok = offs_p < hdim
    first = pid_split * heads_per_split
    for hh in range(first, tl.minimum(first + heads_per_split, heads_per_group)):
        head = pid_g * heads_per_group + hh
        dy_h = dy_ptr + pid_b * stride_x_b + chunk_start * stride_x_l + head * stride_x_h
        st_h = states_in_ptr + pid_b * stride_st_b + pid_c * stride_st_c + head * stride_st_h
        dyt = tl.load(dy_h + offs_m[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
                      mask=m_ok[:, None] & p_ok[None, :], other=0.0)
        st = tl.load(st_h + offs_p[:, None] * stride_st_p + offs_n[None, :] * stride_st_n,
                     mask=p_ok[:, None] & n_ok[None, :], other=0.0)
        acc_h = tl.dot(dyt, st.to(dyt.dtype))
        dA_h = pid_b * stride_dt_b + head * stride_dt_h + pid_c * stride_dt_c
        dA_m = tl.load(dA_cumsum_ptr + dA_h + offs_m * stride_dt_q, mask=m_ok, other=0.0)
        acc_h *= tl.where(keep, tl.exp(tl.where(keep, dA_m, 0.0)), 0.0)[:, None]
        acc += acc_h
        # d y_offdiag[t] / d dA_cumsum[t] = y_offdiag[t], so the gradient is dy[t]·y_offdiag[t]
        tl.atomic_add(ddA_cumsum_ptr + dA_h + offs_m * stride_dt_q, tl.sum(acc_h * C_t, axis=1), mask=m_ok,
                      sem="relaxed")
    dC_ptr += pid_split * stride_dC_split + pid_b * stride_dC_b + chunk_start * stride_dC_l + pid_g * stride_dC_g
    tl.store(dC_ptr + offs_m[:, None] * stride_dC_l + offs_n[None, :] * stride_dC_n,
             acc.to(dC_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _D_args(D):
    # D: None, (h,) or (h, p)  ->  pointer, its head stride, per-channel flag
    if D is None:
        return None, 0, False
    return D, D.stride(0), D.dim() == 2


def chunk_scan_fwd(cb, x, dt, dA_cumsum, C, states_in, D=None, z=None, seq_idx=None, factor_decay=False):
    # cb: (b, c, g, q, q)  x, z: (b, l, h, p)  dt, dA_cumsum: (b, h, c, q)  C: (b, l, g, n)
    # states_in: (b, c, h, p, n)  ->  y (b, l, h, p) in x's dtype, and y before the gate (or None)
    # factor_decay: only where dt >= 0 (combined.py: factored decay)
    tile, opts = launch.settings("chunk_scan_fwd", x.dtype)
    b, l, h, p = x.shape
    g, n = C.shape[2:]
    nchunks, chunk_size = dt.shape[2:]
    assert z is None or z.stride() == x.stride(), "z and x must share strides"
    y = torch.empty_like(x)
    y_pregate = torch.empty_like(x) if z is not None else None
    D_ptr, stride_D, per_channel = _D_args(D)
    block_m, block_n = launch.block(chunk_size, tile), launch.block(p, tile)
    block_k = launch.k_block("chunk_scan_fwd", chunk_size, x.dtype)
    grid, heads_fastest = launch.head_grid("chunk_scan_fwd", cdiv(chunk_size, block_m) * cdiv(p, block_n),
                                           b * nchunks, h, shared=cb)
    _chunk_scan_fwd_kernel[grid](
        cb, x, z, dt, dA_cumsum, C, states_in, D_ptr, seq_idx, y, y_pregate,
        l, nchunks, chunk_size, p, n, h // g,
        *x.stride(), *C.stride(), *cb.stride(), *dt.stride(), *states_in.stride(),
        *launch.seq_strides(seq_idx), stride_D,
        HAS_D=D is not None, D_PER_CHANNEL=per_channel, HAS_Z=z is not None, HAS_SEQ=seq_idx is not None,
        FACTOR_DECAY=factor_decay,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_DSTATE=launch.dstate_block("chunk_scan_fwd", n, x.dtype),
        HEADS_FASTEST=heads_fastest, **opts,
    )
    return y, y_pregate


def gate_bwd(dout, z, y_pregate):
    # dout, z, y_pregate: (b, l, h, p) contiguous  ->  dy (before the gate), dz
    dy, dz = torch.empty_like(y_pregate), torch.empty_like(z)
    block = 1024
    _gate_bwd_kernel[(cdiv(z.numel(), block),)](dout, z, y_pregate, dy, dz, z.numel(), BLOCK=block)
    return dy, dz


def chunk_scan_bwd_dstates(dy, C, dA_cumsum, seq_idx=None):
    # dy: (b, l, h, p)  C: (b, l, g, n)  dA_cumsum: (b, h, c, q)  ->  d states_in: (b, c, h, p, n) fp32
    tile, opts = launch.settings("chunk_scan_bwd_dstates", dy.dtype)
    b, l, h, p = dy.shape
    g, n = C.shape[2:]
    nchunks, chunk_size = dA_cumsum.shape[2:]
    dstates_in = torch.empty(b, nchunks, h, p, n, device=dy.device, dtype=torch.float32)
    block_p, block_k = launch.block(p, tile), launch.block(chunk_size, tile)
    block_n = launch.dstate_block("chunk_scan_bwd_dstates", n, dy.dtype)
    grid, heads_fastest = launch.head_grid("chunk_scan_bwd_dstates", cdiv(p, block_p) * cdiv(n, block_n),
                                           b * nchunks, h)
    _chunk_scan_bwd_dstates_kernel[grid](
        dy, C, dA_cumsum, seq_idx, dstates_in,
        l, nchunks, chunk_size, p, n, h // g,
        *dy.stride(), *C.stride(), *dA_cumsum.stride(), *dstates_in.stride(), *launch.seq_strides(seq_idx),
        HAS_SEQ=seq_idx is not None, BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_K=block_k,
        HEADS_FASTEST=heads_fastest, **opts,
    )
    return dstates_in


def chunk_scan_bwd_dx(cb, dy, x, B, dstates, dt, dA_cumsum, ddt, D=None, seq_idx=None, factor_decay=False):
    # cb: (b, c, g, q, q)  dy, x: (b, l, h, p)  B: (b, l, g, n)  dstates: (b, c, h, p, n)
    # dt, dA_cumsum, ddt: (b, h, c, q), ddt accumulated in place  ->  dx like x, dD (h, p) fp32 or None
    # factor_decay: only where dt >= 0 (combined.py: factored decay)
    tile, opts = launch.settings("chunk_scan_bwd_dx", x.dtype)
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    nchunks, chunk_size = dt.shape[2:]
    assert dy.stride() == x.stride(), "dy and x must share strides"
    dx = torch.empty_like(x)
    dD = torch.zeros(h, p, device=x.device, dtype=torch.float32) if D is not None else None
    D_ptr, stride_D, per_channel = _D_args(D)
    block_m, block_n = launch.block(chunk_size, tile), launch.block(p, tile)
    block_k = launch.k_block("chunk_scan_bwd_dx", chunk_size, x.dtype)
    grid, heads_fastest = launch.head_grid("chunk_scan_bwd_dx", cdiv(chunk_size, block_m) * cdiv(p, block_n),
                                           b * nchunks, h)
    _chunk_scan_bwd_dx_kernel[grid](
        cb, dy, x, B, dstates, dt, dA_cumsum, D_ptr, seq_idx, dx, ddt, dD,
        l, nchunks, chunk_size, p, n, h // g,
        *x.stride(), *B.stride(), *cb.stride(), *dt.stride(), *dstates.stride(),
        *launch.seq_strides(seq_idx), stride_D,
        HAS_D=D is not None, D_PER_CHANNEL=per_channel, HAS_SEQ=seq_idx is not None, FACTOR_DECAY=factor_decay,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_DSTATE=launch.dstate_block("chunk_scan_bwd_dx", n, x.dtype),
        HEADS_FASTEST=heads_fastest, **opts,
    )
    return dx, dD


def chunk_scan_bwd_dc(dcb, B, C, dy, states_in, dA_cumsum, ddA_cumsum, seq_idx=None, out=None):
    # dcb: (b, c, g, q, q)  B, C: (b, l, g, n)  dy: (b, l, h, p)  states_in: (b, c, h, p, n)
    # dA_cumsum, ddA_cumsum: (b, h, c, q), ddA_cumsum accumulated in place  ->  dC like C,
    # written into `out` (C's shape and dtype, any strides) where given
    tile, opts = launch.settings("chunk_scan_bwd_dc", C.dtype)
    b, l, h, p = dy.shape
    g, n = C.shape[2:]
    nchunks, chunk_size = dA_cumsum.shape[2:]
    block_m = block_k = launch.block(chunk_size, tile)
    block_n = launch.dstate_block("chunk_scan_bwd_dc", n, C.dtype)
    tiles = cdiv(chunk_size, block_m) * cdiv(n, block_n)
    unsplit_programs = tiles * b * nchunks * g
    dC, splits, heads_per_split = launch.group_grad_output("chunk_scan_bwd_dc", B, C, h // g, unsplit_programs, out)
    grid = (tiles, b * nchunks, g * splits)
    _chunk_scan_bwd_dc_kernel[grid](
        dcb, B, C, dy, states_in, dA_cumsum, seq_idx, dC, ddA_cumsum,
        l, nchunks, chunk_size, p, n, h // g, splits, heads_per_split,
        *dy.stride(), *C.stride(), *dcb.stride(), *dA_cumsum.stride(), *states_in.stride(),
        *launch.seq_strides(seq_idx), *dC.stride(),
        HAS_SEQ=seq_idx is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_HDIM=launch.whole(p),
        **opts,
    )
    return launch.sum_splits(dC, C.dtype, out)
