"""Causal depthwise conv1d over channels-last x: forward and backward kernels and launchers.

    pre[t, c] = bias[c] + sum_k weight[c, k] · x[t - (w-1) + k, c],   out = act(pre)

Rows before t = 0 come from initial_state; with seq_idx a tap from another document reads
zero (kernels.reference.causal_conv1d states the semantics). The forward tiles (seq block,
channel block): a channel block of a row is contiguous, and the w shifted reads of a tile hit
in cache, so DRAM sees one read of x and one write of out (bandwidth-bound).

Backward, with dpre = dout · act'(pre):
    dx[t]        = sum_s weight[:, w-1-s] · dpre[t+s]   (over t+s of t's document)
    dweight[:, k] = sum_t dpre[t] · x[t-(w-1)+k],   dbias = sum_t dpre[t]
dx needs dpre at the w-1 rows after t. Within a 2-D tile that is a shift across rows: a
tl.gather through shared memory (the previous design: 128 x 16 tiles, 24% of copy bandwidth), or
dpre recomputed at each of the w shifted row sets, which costs w sigmoids and w² multiply-adds per
element: ~85 instructions per element, ~0.4 ms of issue at b8 L2048 d8448 (138 M elements, ~30 T
lane-instructions/s on an H100) against ~0.3 ms of DRAM traffic. So the backward walks the
sequence instead. A tile is BLOCK_L rows x BLOCK_D channels (128 channels: 256 contiguous bytes a
row); its rows are BLOCK_L stretches of STEPS consecutive rows, and step j takes row start + j of
every stretch. The last w-1 rows' x, documents and dpre stay in registers and slide by one row a
step (a row shift is a register rename), so each row's dpre is computed once (one sigmoid per
element, ~35 instructions in all), x and dout are read once, and step j finishes dx of row
start + j - (w-1). A stretch also reads the w-1 rows before it and walks w-1 steps past its end
to finish its last dx rows: (w-1)/STEPS more math, and as many more reads, from L2 when the
neighbouring stretch's reads are still there (else DRAM). Reads run two steps
ahead of their use, so that a step's loads overlap the steps before (the compiler cannot move a
load above a store that might alias it). dweight/dbias accumulate per tile element in registers,
are reduced once per program into per-program partials, and summed after (deterministic).
"""

import torch
import triton
import triton.language as tl

from ..cached_launch import cached_launch
from ..column_sum import column_sum
from ..host_math import cdiv, next_power_of_2


@triton.jit
def _read_rows(x_ptr, init_ptr, seq_idx_ptr, batch, src, docs, cols, mask, seqlen,
               stride_x_b, stride_x_l, stride_x_d, stride_init_b, stride_init_l, stride_init_d,
               stride_seq_b, stride_seq_l,
               WIDTH: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr):
    # src: (R,) the input row each output row reads (negative: an initial_state row); docs: (R,)
    # the output rows' documents; mask: (R, C). Returns (R, C) fp32, zero across documents.
    vals = tl.load(x_ptr + batch * stride_x_b + src[:, None] * stride_x_l + cols[None, :] * stride_x_d,
                   mask=mask & (src >= 0)[:, None], other=0.0)
    if HAS_INIT:
        # the reference casts the state to x's dtype before using it
        vals += tl.load(init_ptr + batch * stride_init_b + (src + WIDTH - 1)[:, None] * stride_init_l
                        + cols[None, :] * stride_init_d, mask=mask & (src < 0)[:, None], other=0.0).to(vals.dtype)
    vals = vals.to(tl.float32)
    if HAS_SEQ:
        # initial_state rows continue the first document: they carry seq_idx[:, 0]; rows past
        # the end (masked outputs) read the last id
        src_row = tl.minimum(tl.maximum(src, 0), seqlen - 1)
        src_docs = tl.load(seq_idx_ptr + batch * stride_seq_b + src_row * stride_seq_l)
        vals = tl.where((src_docs == docs)[:, None], vals, 0.0)
    return vals


@cached_launch
@triton.jit
def _conv1d_fwd_kernel(
    x_ptr, weight_ptr, bias_ptr, init_ptr, seq_idx_ptr, out_ptr, final_ptr,
    seqlen, dim,
    stride_x_b, stride_x_l, stride_x_d, stride_w_d, stride_w_k,
    stride_init_b, stride_init_l, stride_init_d, stride_seq_b, stride_seq_l,
    stride_out_b, stride_out_l, stride_out_d, stride_final_b, stride_final_l, stride_final_d,
    WIDTH: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_FINAL: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_STATE: tl.constexpr,
):
    # x, out: (b, l, d)  weight: (d, w)  init, final: (b, w-1, d)  seq_idx: (b, l)
    # one program per (channel block, seq block, batch): channel blocks vary fastest, so the
    # programs running together read neighbouring parts of the same rows
    pid_d, pid_l, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    mask = (rows < seqlen)[:, None] & col_ok[None, :]
    docs = rows   # unused without seq_idx
    if HAS_SEQ:
        docs = tl.load(seq_idx_ptr + batch * stride_seq_b + rows * stride_seq_l, mask=rows < seqlen, other=0)
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(WIDTH):
        w_k = tl.load(weight_ptr + cols * stride_w_d + k * stride_w_k, mask=col_ok, other=0.0).to(tl.float32)
        acc += w_k[None, :] * _read_rows(
            x_ptr, init_ptr, seq_idx_ptr, batch, rows - (WIDTH - 1) + k, docs, cols, mask, seqlen,
            stride_x_b, stride_x_l, stride_x_d, stride_init_b, stride_init_l, stride_init_d,
            stride_seq_b, stride_seq_l, WIDTH, HAS_INIT, HAS_SEQ)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + batch * stride_out_b + rows[:, None] * stride_out_l + cols[None, :] * stride_out_d,
             acc.to(out_ptr.dtype.element_ty), mask=mask)

    if HAS_FINAL:
        if pid_l == tl.num_programs(1) - 1:
            # the last w-1 input rows (raw, before the conv), zeroed where they belong to an
            # earlier document than the last token's
            j = tl.arange(0, BLOCK_STATE)
            state_mask = (j < WIDTH - 1)[:, None] & col_ok[None, :]
            last_doc = j * 0
            if HAS_SEQ:
                last_doc += tl.load(seq_idx_ptr + batch * stride_seq_b + (seqlen - 1) * stride_seq_l)
            state = _read_rows(
                x_ptr, init_ptr, seq_idx_ptr, batch, seqlen - (WIDTH - 1) + j, last_doc, cols, state_mask, seqlen,
                stride_x_b, stride_x_l, stride_x_d, stride_init_b, stride_init_l, stride_init_d,
                stride_seq_b, stride_seq_l, WIDTH, HAS_INIT, HAS_SEQ)
            tl.store(final_ptr + batch * stride_final_b + j[:, None] * stride_final_l + cols[None, :] * stride_final_d,
                     state.to(final_ptr.dtype.element_ty), mask=state_mask)


@triton.jit
def _history_rows(x_ptr, init_ptr, seq_idx_ptr, batch, src, cols, col_ok, seqlen,
                  stride_x_b, stride_x_l, stride_x_d, stride_init_b, stride_init_l, stride_init_d,
                  stride_seq_b, stride_seq_l,
                  WIDTH: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr):
    # src: (R,) input rows, negative ones initial_state rows. Returns the raw rows (R, C) fp32, zero
    # past the end, and their documents (R,): initial_state rows continue seq_idx[:, 0]
    vals = tl.load(x_ptr + batch * stride_x_b + src[:, None] * stride_x_l + cols[None, :] * stride_x_d,
                   mask=((src >= 0) & (src < seqlen))[:, None] & col_ok[None, :], other=0.0)
    if HAS_INIT:
        # the reference casts the state to x's dtype before using it
        vals += tl.load(init_ptr + batch * stride_init_b + (src + WIDTH - 1)[:, None] * stride_init_l
                        + cols[None, :] * stride_init_d, mask=(src < 0)[:, None] & col_ok[None, :],
                        other=0.0).to(vals.dtype)
    docs = src   # unused without seq_idx
    if HAS_SEQ:
        docs = tl.load(seq_idx_ptr + batch * stride_seq_b + tl.minimum(tl.maximum(src, 0), seqlen - 1) * stride_seq_l)
    return vals.to(tl.float32), docs


@triton.jit
def _step_rows(x_ptr, dout_ptr, seq_idx_ptr, batch, rows, live, cols, col_ok, seqlen,
               stride_x_b, stride_x_l, stride_x_d, stride_dout_b, stride_dout_l, stride_dout_d,
               stride_seq_b, stride_seq_l, HAS_SEQ: tl.constexpr):
    # one step's reads at rows (R,) >= 0, in the inputs' dtype: x, dout (zero past the end, and
    # everywhere unless `live`: a prefetch past the last step) and the rows' documents
    ok = (rows < seqlen) & live
    mask = ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + batch * stride_x_b + rows[:, None] * stride_x_l + cols[None, :] * stride_x_d,
                mask=mask, other=0.0)
    dout = tl.load(dout_ptr + batch * stride_dout_b + rows[:, None] * stride_dout_l + cols[None, :] * stride_dout_d,
                   mask=mask, other=0.0)
    docs = rows   # unused without seq_idx
    if HAS_SEQ:
        docs = tl.load(seq_idx_ptr + batch * stride_seq_b + rows * stride_seq_l, mask=ok, other=0)
    return x, dout, docs


@triton.jit
def _pick(lag: tl.constexpr, v0, v1, v2, v3):
    # the value at a constexpr lag (window slots are separate variables, not an indexable list)
    picked = v0
    if lag == 1:
        picked = v1
    if lag == 2:
        picked = v2
    if lag == 3:
        picked = v3
    return picked


@triton.jit
def _same_doc(vals, docs, docs_ref, HAS_SEQ: tl.constexpr):
    # vals (R, C) where row r's document is docs_ref[r], else 0
    if HAS_SEQ:
        vals = tl.where((docs == docs_ref)[:, None], vals, 0.0)
    return vals


@cached_launch
@triton.jit
def _conv1d_bwd_kernel(
    x_ptr, weight_ptr, bias_ptr, init_ptr, seq_idx_ptr, dout_ptr, dfinal_ptr,
    dx_ptr, dweight_part_ptr, dbias_part_ptr, dinit_ptr,
    seqlen, dim,
    stride_x_b, stride_x_l, stride_x_d, stride_w_d, stride_w_k,
    stride_init_b, stride_init_l, stride_init_d, stride_seq_b, stride_seq_l,
    stride_dout_b, stride_dout_l, stride_dout_d, stride_dfinal_b, stride_dfinal_l, stride_dfinal_d,
    stride_dx_b, stride_dx_l, stride_dx_d, stride_dinit_b, stride_dinit_l, stride_dinit_d,
    WIDTH: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_DFINAL: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    STEPS: tl.constexpr,
):
    # dout, dx: (b, l, d)  dfinal, dinit: (b, w-1, d)  dweight_part: (b, programs, w, d) fp32
    # dbias_part: (b, programs, d) fp32. Tile row r owns the STEPS rows from starts[r]; step j
    # reads row u = starts + j and finishes dx of row t = u - (w-1). The window holds rows u-1
    # (slot 1) .. u-(w-1) (x raw, their documents, dpre); slots past w-1 stay unused.
    pid_d, pid_l, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    starts = (pid_l * BLOCK_L + tl.arange(0, BLOCK_L)) * STEPS
    N_STEPS: tl.constexpr = STEPS + WIDTH - 1

    # weight[:, k] (zero past the width) and the bias, as (1, C) rows
    w0 = tl.load(weight_ptr + cols * stride_w_d, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    w1 = tl.load(weight_ptr + cols * stride_w_d + stride_w_k, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    w2 = tl.zeros((1, BLOCK_D), dtype=tl.float32)
    w3 = tl.zeros((1, BLOCK_D), dtype=tl.float32)
    if WIDTH >= 3:
        w2 += tl.load(weight_ptr + cols * stride_w_d + 2 * stride_w_k, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if WIDTH >= 4:
        w3 += tl.load(weight_ptr + cols * stride_w_d + 3 * stride_w_k, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    bias = tl.zeros((1, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    last_doc = 0
    if HAS_SEQ:
        last_doc = tl.load(seq_idx_ptr + batch * stride_seq_b + (seqlen - 1) * stride_seq_l)
    # only the program holding the last w-1 rows adds the final state's gradient
    near_end = (pid_l + 1) * BLOCK_L * STEPS > seqlen - (WIDTH - 1)

    # the window before the first step: the w-1 input rows before each start (initial_state rows
    # before row 0); their dpre is zero (rows < 0 have none; rows of the previous tile row only feed
    # dx rows that tile row owns)
    # every window slot and accumulator starts as its own tl.zeros: the compiler carries a variable
    # through the loop only if the loop body changes its IR value, so `p2 = p1` with p1 and p2 the
    # same zeros would leave p2 zero in every step (the interpreter has no such rule)
    x1, d1 = _history_rows(x_ptr, init_ptr, seq_idx_ptr, batch, starts - 1, cols, col_ok, seqlen,
                           stride_x_b, stride_x_l, stride_x_d, stride_init_b, stride_init_l, stride_init_d,
                           stride_seq_b, stride_seq_l, WIDTH, HAS_INIT, HAS_SEQ)
    x2, d2 = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32), d1
    x3, d3 = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32), d1
    if WIDTH >= 3:
        x2, d2 = _history_rows(x_ptr, init_ptr, seq_idx_ptr, batch, starts - 2, cols, col_ok, seqlen,
                               stride_x_b, stride_x_l, stride_x_d, stride_init_b, stride_init_l, stride_init_d,
                               stride_seq_b, stride_seq_l, WIDTH, HAS_INIT, HAS_SEQ)
    if WIDTH >= 4:
        x3, d3 = _history_rows(x_ptr, init_ptr, seq_idx_ptr, batch, starts - 3, cols, col_ok, seqlen,
                               stride_x_b, stride_x_l, stride_x_d, stride_init_b, stride_init_l, stride_init_d,
                               stride_seq_b, stride_seq_l, WIDTH, HAS_INIT, HAS_SEQ)
    p1 = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    p2 = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    p3 = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    dweight0 = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    dweight1 = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    dweight2 = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    dweight3 = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)

    # reads run two steps ahead: a step's loads do not wait for the previous step's dx store
    xn1, gn1, dn1 = _step_rows(x_ptr, dout_ptr, seq_idx_ptr, batch, starts, True, cols, col_ok, seqlen,
                               stride_x_b, stride_x_l, stride_x_d, stride_dout_b, stride_dout_l, stride_dout_d,
                               stride_seq_b, stride_seq_l, HAS_SEQ)
    xn2, gn2, dn2 = _step_rows(x_ptr, dout_ptr, seq_idx_ptr, batch, starts + 1, True, cols, col_ok, seqlen,
                               stride_x_b, stride_x_l, stride_x_d, stride_dout_b, stride_dout_l, stride_dout_d,
                               stride_seq_b, stride_seq_l, HAS_SEQ)
    for j in range(0, N_STEPS):
        x0, dpre, d0 = xn1.to(tl.float32), gn1.to(tl.float32), dn1
        xn1, gn1, dn1 = xn2, gn2, dn2
        xn2, gn2, dn2 = _step_rows(x_ptr, dout_ptr, seq_idx_ptr, batch, starts + j + 2, j + 2 < N_STEPS, cols,
                                   col_ok, seqlen, stride_x_b, stride_x_l, stride_x_d, stride_dout_b,
                                   stride_dout_l, stride_dout_d, stride_seq_b, stride_seq_l, HAS_SEQ)

        # row u's taps: slot m holds input row u-m, read by tap k = w-1-m (zero across documents)
        t1 = _same_doc(x1, d1, d0, HAS_SEQ)
        t2 = _same_doc(x2, d2, d0, HAS_SEQ)
        t3 = _same_doc(x3, d3, d0, HAS_SEQ)
        if SILU:
            pre = bias + w0 * _pick(WIDTH - 1, x0, t1, t2, t3) + w1 * _pick(WIDTH - 2, x0, t1, t2, t3)
            if WIDTH >= 3:
                pre += w2 * _pick(WIDTH - 3, x0, t1, t2, t3)
            if WIDTH >= 4:
                pre += w3 * x0
            sig = tl.sigmoid(pre)
            dpre = dpre * sig * (1.0 + pre * (1.0 - sig))   # silu'(p) = σ(p)·(1 + p·(1 - σ(p)))

        # weight and bias gradients over the owned rows (the last w-1 steps read the next tile
        # row's first rows only to finish dx)
        dpre_owned = tl.where(j < STEPS, dpre, 0.0)
        dbias += dpre_owned
        dweight0 += dpre_owned * _pick(WIDTH - 1, x0, t1, t2, t3)
        dweight1 += dpre_owned * _pick(WIDTH - 2, x0, t1, t2, t3)
        if WIDTH >= 3:
            dweight2 += dpre_owned * _pick(WIDTH - 3, x0, t1, t2, t3)
        if WIDTH >= 4:
            dweight3 += dpre_owned * x0

        # dx[t] = sum_s weight[:, w-1-s] · dpre[t+s] over t+s of t's document, t = u-(w-1): row
        # u-m (slot m, slot 0 being u) reaches row t through tap m
        doc_t = _pick(WIDTH - 1, d0, d1, d2, d3)
        dx = w0 * _same_doc(dpre, d0, doc_t, HAS_SEQ) + w1 * _same_doc(p1, d1, doc_t, HAS_SEQ)
        if WIDTH >= 3:
            dx += w2 * _same_doc(p2, d2, doc_t, HAS_SEQ)
        if WIDTH >= 4:
            dx += w3 * p3
        rows_t = starts + j - (WIDTH - 1)
        if HAS_DFINAL:
            if near_end:
                # the final state copies input rows l-(w-1)..l-1 (those of the last document); with
                # l < w-1 some are initial_state rows (rows_t < 0, first document)
                j_final = rows_t - (seqlen - (WIDTH - 1))
                keep = (j_final >= 0) & (rows_t < seqlen)
                if HAS_SEQ:
                    keep = keep & (doc_t == last_doc)
                dx += tl.load(dfinal_ptr + batch * stride_dfinal_b + j_final[:, None] * stride_dfinal_l
                              + cols[None, :] * stride_dfinal_d, mask=keep[:, None] & col_ok[None, :],
                              other=0.0).to(tl.float32)
        if j >= WIDTH - 1:
            tl.store(dx_ptr + batch * stride_dx_b + rows_t[:, None] * stride_dx_l + cols[None, :] * stride_dx_d,
                     dx.to(dx_ptr.dtype.element_ty), mask=(rows_t < seqlen)[:, None] & col_ok[None, :])
        if HAS_INIT:
            if j < WIDTH - 1:
                # rows before 0 are initial_state row t + w-1 (only the tile row starting at 0 has them)
                tl.store(dinit_ptr + batch * stride_dinit_b + (rows_t + WIDTH - 1)[:, None] * stride_dinit_l
                         + cols[None, :] * stride_dinit_d, dx.to(dinit_ptr.dtype.element_ty),
                         mask=(rows_t < 0)[:, None] & col_ok[None, :])

        # slide the window one row
        if WIDTH >= 4:
            x3, d3, p3 = x2, d2, p2
        if WIDTH >= 3:
            x2, d2, p2 = x1, d1, p1
        x1, d1, p1 = x0, d0, dpre

    part = batch * tl.num_programs(1) + pid_l
    part_ptr = dweight_part_ptr + part * WIDTH * dim + cols
    tl.store(part_ptr, tl.sum(dweight0, axis=0), mask=col_ok)
    tl.store(part_ptr + dim, tl.sum(dweight1, axis=0), mask=col_ok)
    if WIDTH >= 3:
        tl.store(part_ptr + 2 * dim, tl.sum(dweight2, axis=0), mask=col_ok)
    if WIDTH >= 4:
        tl.store(part_ptr + 3 * dim, tl.sum(dweight3, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + part * dim + cols, tl.sum(dbias, axis=0), mask=col_ok)


# Tile sizes, read at each call (tests shrink them to span several tiles at small lengths).
# Forward: 32 x 128 tiles at 4 warps, 32 values per thread. `bench/bench_kernels.py --sweep` on
# an H100 at contiguous (8, 2048, 8448) first chose 32 x 64 (0.257 ms, 72% of copy bandwidth;
# 64 x 64 at 8 warps: 0.284); in the mixer's layout (column slices of in_proj's output,
# `bench/bench_row_stride.py --sweep-conv`) 32 x 128 is faster: x's channels 0.101 → 0.091 ms at
# 130m (b16 L2048), 0.069 → 0.063 at 1.3b (b4 L2048); 64-row, 8-warp and 256-wide tiles were slower.
# Backward: 4 x 128 tiles at 4 warps, 4 values per thread per tile; ~16 tiles are live (x and
# dpre of the w-1 window rows, w dweight and a dbias accumulator, two prefetched steps, the
# step's math). The sm_90 compile gives 112 registers at width 4 with bias (121 with
# seq_idx), no spills: 4 CTAs, 16 warps per SM; 8 values per thread would take 208 registers.
# 64 steps: programs of 256 rows, 3/64 more math at stretch ends, dweight/dbias partials ~1%
# of the bytes moved. Chosen by the same sweep at (8, 2048, 8448): 0.455 ms (61%; 32 steps:
# 0.504, 16 steps: 0.554, 1 x 512 tiles: 0.475); the previous backward (128 x 16 tiles, dpre
# shifted by tl.gather) took about 1.6 ms. In the mixer's layout no other backward tile was
# faster by more than 5% (--sweep-conv).
FWD_BLOCK_L, FWD_BLOCK_D, FWD_WARPS = 32, 128, 4
BWD_BLOCK_L, BWD_BLOCK_D, BWD_WARPS, BWD_STEPS = 4, 128, 4, 64
# From BWD_WIDE_FROM channels on: 2 x 128 tiles at 2 warps walking 128 steps (half the
# stretch-end work; CTAs half the size). Swept on an H100, backward alone, ms (4 x 128 / 4 warps /
# 64 steps -> this): contiguous b8 L2048 d3328 0.206 -> 0.194 and d8448 0.442 -> 0.408
# (`bench_kernels.py --sweep`); in the mixer's layout (`bench_row_stride.py --sweep-conv`) 1.3b's
# x (d4096, b4) 0.129 -> 0.115, but 130m's x (d1536, b16) 0.188 -> 0.202 and B|C (d256) 0.057 ->
# 0.083 / 0.027 -> 0.038: narrower convs keep the tiles above. The threshold lies between the
# widths measured (1536 slower, 3328 faster).
BWD_WIDE_FROM, BWD_WIDE_BLOCK_L, BWD_WIDE_WARPS, BWD_WIDE_STEPS = 3072, 2, 2, 128
# A grid of fewer warps than this walks fewer steps a program (halving them, not below
# BWD_MIN_STEPS), as a program's time is its steps whatever the grid. Swept in the mixer's
# layout (`bench_row_stride.py --sweep-conv`, H100, ms, the steps above -> the rule's): 1.3b's x
# (b4 L2048 d4096: 1024 programs of 2 warps), a TP=2 rank's x (d2048: 512 of 4) and 130m's x
# (b16 d1536) keep theirs; B|C (d256) at b4 takes 16 steps, 0.027 -> 0.020 (1.3b), 0.025 ->
# 0.016 (a CP=2 rank's 1024 tokens a row), and at b16 32 steps, 0.057 -> 0.050 (130m; 16: 0.070);
# a CP=2 rank's x 64 steps, 0.090 -> 0.066. Each rule's pick was the best swept or within 0.004.
BWD_GRID_WARPS, BWD_MIN_STEPS = 2048, 16


def _strides(t, n):
    return t.stride() if t is not None else (0,) * n


def _block_d(dim, widest):
    return min(widest, max(16, next_power_of_2(dim)))


def conv1d_fwd(x, weight, bias=None, initial_state=None, seq_idx=None, activation="silu",
               return_final_state=False, block_l=None, block_d=None, num_warps=None):
    # x: (b, l, d)  weight: (d, w)  bias: (d,)  initial_state: (b, w-1, d)  seq_idx: (b, l)
    # -> out (b, l, d) and final_state (b, w-1, d) or None, both in x's dtype
    b, l, d = x.shape
    width = weight.shape[1]
    block_l, block_d = block_l or FWD_BLOCK_L, block_d or _block_d(d, FWD_BLOCK_D)
    out = torch.empty(b, l, d, device=x.device, dtype=x.dtype)
    final = torch.empty(b, width - 1, d, device=x.device, dtype=x.dtype) if return_final_state else None
    grid = (cdiv(d, block_d), cdiv(l, block_l), b)
    _conv1d_fwd_kernel[grid](
        x, weight, bias, initial_state, seq_idx, out, final, l, d,
        *x.stride(), *weight.stride(), *_strides(initial_state, 3), *_strides(seq_idx, 2),
        *out.stride(), *_strides(final, 3),
        WIDTH=width, SILU=activation == "silu", HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None,
        HAS_SEQ=seq_idx is not None, HAS_FINAL=return_final_state, BLOCK_L=block_l, BLOCK_D=block_d,
        BLOCK_STATE=next_power_of_2(width - 1), num_warps=num_warps or FWD_WARPS,
    )
    return out, final


def bwd_steps(b, l, d, block_l, block_d, num_warps, steps):
    """The steps a backward program walks: `steps`, halved while the grid has fewer than
    BWD_GRID_WARPS warps (not below BWD_MIN_STEPS)."""
    while steps > BWD_MIN_STEPS and b * cdiv(d, block_d) * cdiv(l, block_l * steps) * num_warps < BWD_GRID_WARPS:
        steps //= 2
    return steps


def conv1d_bwd(dout, dfinal, x, weight, bias=None, initial_state=None, seq_idx=None, activation="silu",
               block_l=None, block_d=None, num_warps=None, steps=None, dx_out=None):
    # dout: (b, l, d)  dfinal: (b, w-1, d) or None  ->  dx, dweight, dbias (or None), dinit (or None),
    # each in its input's dtype. A tile is block_l rows (one per tile row, `steps` rows apart) by
    # block_d channels; a program walks `steps` consecutive tiles. dx_out: where to write dx (any
    # strides, e.g. a column slice of a larger gradient), else a new tensor.
    b, l, d = x.shape
    width = weight.shape[1]
    default_l, default_warps, default_steps = ((BWD_WIDE_BLOCK_L, BWD_WIDE_WARPS, BWD_WIDE_STEPS) if d >= BWD_WIDE_FROM
                                               else (BWD_BLOCK_L, BWD_WARPS, BWD_STEPS))
    block_l, block_d = block_l or default_l, block_d or _block_d(d, BWD_BLOCK_D)
    num_warps = num_warps or default_warps
    # a short sequence: fewer steps, so that the tile rows do not walk far past its end (a power
    # of two: few compiled variants)
    steps = min(steps or bwd_steps(b, l, d, block_l, block_d, num_warps, default_steps),
                next_power_of_2(cdiv(l, block_l)))
    programs = cdiv(l, block_l * steps)
    dx = torch.empty(b, l, d, device=x.device, dtype=x.dtype) if dx_out is None else dx_out
    assert dx.shape == x.shape and dx.dtype == x.dtype, "dx_out must match x's shape and dtype"
    dweight_part = torch.empty(b, programs, width, d, device=x.device, dtype=torch.float32)
    dbias_part = torch.empty(b, programs, d, device=x.device, dtype=torch.float32) if bias is not None else None
    dinit = torch.empty_like(initial_state) if initial_state is not None else None
    grid = (cdiv(d, block_d), programs, b)
    _conv1d_bwd_kernel[grid](
        x, weight, bias, initial_state, seq_idx, dout, dfinal, dx, dweight_part, dbias_part, dinit, l, d,
        *x.stride(), *weight.stride(), *_strides(initial_state, 3), *_strides(seq_idx, 2),
        *dout.stride(), *_strides(dfinal, 3), *dx.stride(), *_strides(dinit, 3),
        WIDTH=width, SILU=activation == "silu", HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None,
        HAS_SEQ=seq_idx is not None, HAS_DFINAL=dfinal is not None, BLOCK_L=block_l, BLOCK_D=block_d,
        STEPS=steps, num_warps=num_warps,
    )
    # a partial row holds (width, d); the weight is (d, width): summed into its transpose
    dweight = torch.empty(d, width, device=x.device, dtype=weight.dtype)
    column_sum(dweight_part.view(-1, width, d), dweight.t())
    dbias = column_sum(dbias_part.view(-1, d), torch.empty_like(bias)) if bias is not None else None
    return dx, dweight, dbias, dinit
