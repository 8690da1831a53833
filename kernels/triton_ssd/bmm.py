"""Stage 4a of SSD (DESIGN §3): CB = C·Bᵀ within each chunk, per group (the paper's diagonal
blocks before the decay mask, §6).

Only tiles on or below the diagonal are computed and written; rows and columns past a short
last chunk's end are written as zeros. Readers load whole tiles (tiles.cb_tile) and drop what
lies above the diagonal, past the chunk's end or across documents by select: the tiles above
the diagonal may be unwritten.

Backward (`bmm_bwd_dcb`): the gradient of the group's CB summed over its heads,
    dCB[t, s] = sum_h L_h[t, s] · dt_h[s] · (dy_h[t] · x_h[s]),   L_h = exp(segsum), masked,
and the intra-chunk gradient w.r.t. the decay exponents: with P = dCB_h ⊙ CB,
dA_cumsum[t] gets sum_s P[t, s] and dA_cumsum[s] gets -sum_t P[t, s].
"""

import torch
import triton
import triton.language as tl

from ..cached_launch import cached_launch
from ..host_math import cdiv
from . import launch
from .tiles import cb_tile


@cached_launch
@triton.jit
def _bmm_fwd_kernel(
    C_ptr, B_ptr, cb_ptr,
    seqlen, nchunks, chunk_size, dstate,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_cb_b, stride_cb_c, stride_cb_g, stride_cb_t, stride_cb_s,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # one program per (t block × s block, batch × chunk, group); B and C share strides
    pid_mn, pid_bc, pid_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pid_b, pid_c = pid_bc // nchunks, pid_bc % nchunks
    num_n = tl.cdiv(chunk_size, BLOCK_N)
    pid_m, pid_n = pid_mn // num_n, pid_mn % num_n
    if pid_n * BLOCK_N >= (pid_m + 1) * BLOCK_M:
        return   # tile strictly above the diagonal
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    group_offs = pid_b * stride_B_b + chunk_start * stride_B_l + pid_g * stride_B_g
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, dstate, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        Ct = tl.load(C_ptr + group_offs + offs_m[:, None] * stride_B_l + offs_k[None, :] * stride_B_n,
                     mask=(offs_m[:, None] < chunk_len) & (offs_k[None, :] < dstate), other=0.0)
        # Bᵀ read straight from memory as (n, s)
        BT = tl.load(B_ptr + group_offs + offs_k[:, None] * stride_B_n + offs_n[None, :] * stride_B_l,
                     mask=(offs_k[:, None] < dstate) & (offs_n[None, :] < chunk_len), other=0.0)
        acc += tl.dot(Ct, BT)
    cb_ptr += pid_b * stride_cb_b + pid_c * stride_cb_c + pid_g * stride_cb_g
    tl.store(cb_ptr + offs_m[:, None] * stride_cb_t + offs_n[None, :] * stride_cb_s, acc.to(cb_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < chunk_size) & (offs_n[None, :] < chunk_size))


@cached_launch
@triton.jit
def _bmm_bwd_dcb_kernel(
    dy_ptr, x_ptr, cb_ptr, dt_ptr, dA_cumsum_ptr, seq_idx_ptr, dcb_ptr, ddA_cumsum_ptr,
    seqlen, nchunks, chunk_size, hdim, heads_per_group, splits, heads_per_split,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_cb_b, stride_cb_c, stride_cb_g, stride_cb_t, stride_cb_s, stride_dcb_split,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_q,
    stride_seq_b, stride_seq_l,
    HAS_SEQ: tl.constexpr, FACTOR_DECAY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HDIM: tl.constexpr,
):
    # dy and x share strides: (b, l, h, p); cb: (b, c, g, t, s) fp32; dcb: one such per split
    # of the group's heads (launch.head_split)
    pid_mn, pid_bc, pid_gs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pid_g, pid_split = pid_gs // splits, pid_gs % splits
    pid_b, pid_c = pid_bc // nchunks, pid_bc % nchunks
    num_n = tl.cdiv(chunk_size, BLOCK_N)
    pid_m, pid_n = pid_mn // num_n, pid_mn % num_n
    if pid_n * BLOCK_N >= (pid_m + 1) * BLOCK_M:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # target tokens t
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # source tokens s
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    m_ok = offs_m < chunk_len
    n_ok = offs_n < chunk_len
    keep = m_ok[:, None] & n_ok[None, :] & (offs_m[:, None] >= offs_n[None, :])
    if HAS_SEQ:
        seq_idx_ptr += pid_b * stride_seq_b + chunk_start * stride_seq_l
        seq_m = tl.load(seq_idx_ptr + offs_m * stride_seq_l, mask=m_ok, other=-1)
        seq_n = tl.load(seq_idx_ptr + offs_n * stride_seq_l, mask=n_ok, other=-2)
        keep = keep & (seq_m[:, None] == seq_n[None, :])
    cb_ptr += pid_b * stride_cb_b + pid_c * stride_cb_c + pid_g * stride_cb_g
    cb = tl.where(keep, cb_tile(cb_ptr, offs_m, offs_n, stride_cb_t, stride_cb_s, chunk_size), 0.0)
    dcb = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # a head's whole p in one tile: one tl.dot per head, so the head loop is the innermost loop
    offs_p = tl.arange(0, BLOCK_HDIM)
    p_ok = offs_p < hdim
    # sources wholly before the targets: the decay factors through the target tile's first
    # token (without FACTOR_DECAY, a constexpr, that branch compiles away)
    factored = False
    if FACTOR_DECAY:
        factored = (pid_n + 1) * BLOCK_N <= pid_m * BLOCK_M
    first = pid_split * heads_per_split
    for hh in range(first, tl.minimum(first + heads_per_split, heads_per_group)):
        head = pid_g * heads_per_group + hh
        head_offs = pid_b * stride_x_b + chunk_start * stride_x_l + head * stride_x_h
        dy_t = tl.load(dy_ptr + head_offs + offs_m[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
                       mask=m_ok[:, None] & p_ok[None, :], other=0.0)
        xT = tl.load(x_ptr + head_offs + offs_p[:, None] * stride_x_p + offs_n[None, :] * stride_x_l,
                     mask=p_ok[:, None] & n_ok[None, :], other=0.0)
        dy_x = tl.dot(dy_t, xT)
        dt_offs = pid_b * stride_dt_b + head * stride_dt_h + pid_c * stride_dt_c
        dA_m = tl.load(dA_cumsum_ptr + dt_offs + offs_m * stride_dt_q, mask=m_ok, other=0.0)
        dA_n = tl.load(dA_cumsum_ptr + dt_offs + offs_n * stride_dt_q, mask=n_ok, other=0.0)
        dt_n = tl.load(dt_ptr + dt_offs + offs_n * stride_dt_q, mask=n_ok, other=0.0)
        if factored:   # a tile wholly below the diagonal: two vectors of exps (combined.py: factored decay)
            dA_ref = tl.load(dA_cumsum_ptr + dt_offs + tl.minimum(pid_m * BLOCK_M, chunk_len - 1) * stride_dt_q)
            decay = tl.where(keep, tl.exp(dA_m - dA_ref)[:, None] * tl.exp(dA_ref - dA_n)[None, :], 0.0)
        else:   # -inf above the diagonal before exp: the difference is positive there and may overflow
            decay = tl.exp(tl.where(keep, dA_m[:, None] - dA_n[None, :], float("-inf")))
        dcb_h = dy_x * decay * dt_n[None, :]
        dcb += dcb_h
        P = dcb_h * cb
        tl.atomic_add(ddA_cumsum_ptr + dt_offs + offs_m * stride_dt_q, tl.sum(P, axis=1), mask=m_ok, sem="relaxed")
        tl.atomic_add(ddA_cumsum_ptr + dt_offs + offs_n * stride_dt_q, -tl.sum(P, axis=0), mask=n_ok, sem="relaxed")
    dcb_ptr += pid_split * stride_dcb_split + pid_b * stride_cb_b + pid_c * stride_cb_c + pid_g * stride_cb_g
    tl.store(dcb_ptr + offs_m[:, None] * stride_cb_t + offs_n[None, :] * stride_cb_s, dcb,
             mask=(offs_m[:, None] < chunk_size) & (offs_n[None, :] < chunk_size))


def bmm_fwd(C, B, chunk_size, out_dtype=torch.float32):
    # C, B: (b, l, g, n)  ->  CB: (b, c, g, q, q) in out_dtype (accumulated in fp32), valid on
    # and below the diagonal only
    tile, opts = launch.settings("bmm_fwd", C.dtype)
    b, l, g, n = B.shape
    assert B.stride() == C.stride(), "B and C must share strides"
    nchunks = cdiv(l, chunk_size)
    cb = torch.empty(b, nchunks, g, chunk_size, chunk_size, device=B.device, dtype=out_dtype)
    block_m = block_n = launch.block(chunk_size, tile)
    block_k = launch.dstate_block("bmm_fwd", n, C.dtype)
    grid = (cdiv(chunk_size, block_m) * cdiv(chunk_size, block_n), b * nchunks, g)
    _bmm_fwd_kernel[grid](
        C, B, cb, l, nchunks, chunk_size, n, *B.stride(), *cb.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        **opts,
    )
    return cb


def bmm_bwd_dcb(dy, x, cb, dt, dA_cumsum, ddA_cumsum, seq_idx=None, factor_decay=False):
    # dy, x: (b, l, h, p)  cb: (b, c, g, q, q)  dt, dA_cumsum, ddA_cumsum: (b, h, c, q)
    # -> dcb: (b, c, g, q, q) fp32 (valid on and below the diagonal); ddA_cumsum accumulated
    # factor_decay: only where dt >= 0 (combined.py: factored decay)
    tile, opts = launch.settings("bmm_bwd_dcb", x.dtype)
    b, l, h, p = x.shape
    g = cb.shape[2]
    nchunks, chunk_size = dt.shape[2:]
    assert dy.stride() == x.stride(), "dy and x must share strides"
    assert cb.is_contiguous(), "each split's dcb is written with cb's strides (bmm_fwd's cb is contiguous)"
    block_m = block_n = launch.block(chunk_size, tile)
    tiles = cdiv(chunk_size, block_m) * cdiv(chunk_size, block_n)
    splits, heads_per_split = launch.head_split("bmm_bwd_dcb", h // g, tiles * b * nchunks * g)
    dcb = launch.split_output(splits, cb.shape, cb)
    grid = (tiles, b * nchunks, g * splits)
    _bmm_bwd_dcb_kernel[grid](
        dy, x, cb, dt, dA_cumsum, seq_idx, dcb, ddA_cumsum,
        l, nchunks, chunk_size, p, h // g, splits, heads_per_split,
        *x.stride(), *cb.stride(), dcb.stride(0), *dt.stride(),
        *launch.seq_strides(seq_idx),
        HAS_SEQ=seq_idx is not None, FACTOR_DECAY=factor_decay,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_HDIM=launch.whole(p),
        **opts,
    )
    return launch.sum_splits(dcb, cb.dtype)
