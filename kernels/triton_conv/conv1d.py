"""Causal depthwise conv1d over channels-last x: forward and backward kernels and launchers.

    pre[t, c] = bias[c] + sum_k weight[c, k] · x[t - (w-1) + k, c],   out = act(pre)

Rows before t = 0 come from initial_state; with seq_idx a tap from another document reads
zero (kernels.reference.causal_conv1d states the semantics). Both passes tile (seq block,
channel block): a channel block of a row is contiguous, and the w shifted reads of a tile hit
in cache, so DRAM sees one read of x and one write of out (bandwidth-bound).

Backward, with dpre = dout · act'(pre):
    dx[t]       = sum_s weight[:, w-1-s] · dpre[t+s]   (over t+s of t's document)
    dweight[:,k] = sum_t dpre[t] · x[t-(w-1)+k],   dbias = sum_t dpre[t]
dx needs dpre at rows shifted by 1..w-1. Recomputing the activation at every shift would
cost w sigmoids per element (the SFU, not DRAM, would then bound the kernel), so each tile
computes dpre once and shifts it with tl.gather; tiles overlap by w-1 rows so the shifted
rows are in the tile, and each tile owns (writes dx, counts dweight for) its first
BLOCK_L-(w-1) rows. dweight/dbias are per-program partials summed after (deterministic).
"""

import torch
import triton
import triton.language as tl


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
    TILES: tl.constexpr,
):
    # dout, dx: (b, l, d)  dfinal, dinit: (b, w-1, d)  dweight_part: (b, programs, w, d) fp32
    # dbias_part: (b, programs, d) fp32. A tile spans BLOCK_L rows from t0 and owns the first
    # OWNED; a program takes TILES consecutive tiles and writes one dweight/dbias partial.
    OWNED: tl.constexpr = BLOCK_L - (WIDTH - 1)
    pid_d, pid_l, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    local = tl.arange(0, BLOCK_L)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    taps_idx = tl.arange(0, 4)   # row k of the dweight accumulator is tap k (width <= 4)
    dweight = tl.zeros((4, BLOCK_D), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_SEQ:
        last_doc = tl.load(seq_idx_ptr + batch * stride_seq_b + (seqlen - 1) * stride_seq_l)
        first_doc = tl.load(seq_idx_ptr + batch * stride_seq_b)
    for tile in range(TILES):
        t0 = (pid_l * TILES + tile) * OWNED
        rows = t0 + local
        mask = (rows < seqlen)[:, None] & col_ok[None, :]
        docs = rows
        if HAS_SEQ:
            docs = tl.load(seq_idx_ptr + batch * stride_seq_b + rows * stride_seq_l, mask=rows < seqlen, other=0)

        # dpre on every row of the tile (zero past the end: dout reads 0 there)
        dpre = tl.load(dout_ptr + batch * stride_dout_b + rows[:, None] * stride_dout_l
                       + cols[None, :] * stride_dout_d, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            pre = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
            if HAS_BIAS:
                pre += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            for k in tl.static_range(WIDTH):
                w_k = tl.load(weight_ptr + cols * stride_w_d + k * stride_w_k, mask=col_ok, other=0.0)
                pre += w_k.to(tl.float32)[None, :] * _read_rows(
                    x_ptr, init_ptr, seq_idx_ptr, batch, rows - (WIDTH - 1) + k, docs, cols, mask, seqlen,
                    stride_x_b, stride_x_l, stride_x_d, stride_init_b, stride_init_l, stride_init_d,
                    stride_seq_b, stride_seq_l, WIDTH, HAS_INIT, HAS_SEQ)
            sig = tl.sigmoid(pre)
            dpre = dpre * sig * (1.0 + pre * (1.0 - sig))   # silu'(p) = σ(p)·(1 + p·(1 - σ(p)))

        # weight and bias gradients over the owned rows; the taps are read again (cache hits)
        # rather than kept live through the activation
        owned = mask & (local < OWNED)[:, None]
        dpre_owned = tl.where(owned, dpre, 0.0)
        dbias += tl.sum(dpre_owned, axis=0)
        for k in tl.static_range(WIDTH):
            taps = _read_rows(
                x_ptr, init_ptr, seq_idx_ptr, batch, rows - (WIDTH - 1) + k, docs, cols, owned, seqlen,
                stride_x_b, stride_x_l, stride_x_d, stride_init_b, stride_init_l, stride_init_d,
                stride_seq_b, stride_seq_l, WIDTH, HAS_INIT, HAS_SEQ)
            dweight += tl.where((taps_idx == k)[:, None], tl.sum(dpre_owned * taps, axis=0)[None, :], 0.0)

        # dx[t] = sum_s weight[:, w-1-s] · dpre[t+s]: output t+s reads row t through tap w-1-s
        w_last = tl.load(weight_ptr + cols * stride_w_d + (WIDTH - 1) * stride_w_k, mask=col_ok, other=0.0)
        dx = w_last.to(tl.float32)[None, :] * dpre
        for s in tl.static_range(1, WIDTH):
            # rows past the tile only feed rows the tile does not own: clamp their index
            shift = tl.broadcast_to(tl.minimum(local + s, BLOCK_L - 1)[:, None], (BLOCK_L, BLOCK_D))
            shifted = tl.gather(dpre, shift, 0)
            if HAS_SEQ:
                docs_s = tl.load(seq_idx_ptr + batch * stride_seq_b + (rows + s) * stride_seq_l,
                                 mask=rows + s < seqlen, other=0)
                shifted = tl.where((docs_s == docs)[:, None], shifted, 0.0)
            w_k = tl.load(weight_ptr + cols * stride_w_d + (WIDTH - 1 - s) * stride_w_k, mask=col_ok, other=0.0)
            dx += w_k.to(tl.float32)[None, :] * shifted
        if HAS_DFINAL:
            if t0 + OWNED > seqlen - (WIDTH - 1):
                # the final state copies input rows l-(w-1)..l-1 (those of the last document)
                j = rows - (seqlen - (WIDTH - 1))
                dstate = tl.load(dfinal_ptr + batch * stride_dfinal_b + j[:, None] * stride_dfinal_l
                                 + cols[None, :] * stride_dfinal_d, mask=owned & (j >= 0)[:, None], other=0.0)
                if HAS_SEQ:
                    dstate = tl.where((docs == last_doc)[:, None], dstate, 0.0)
                dx += dstate.to(tl.float32)
        tl.store(dx_ptr + batch * stride_dx_b + rows[:, None] * stride_dx_l + cols[None, :] * stride_dx_d,
                 dx.to(dx_ptr.dtype.element_ty), mask=owned)

        if HAS_INIT:
            if t0 == 0:
                # initial row i (time i-(w-1)) reaches output t <= i through tap i - t, if t is
                # in the first document
                if HAS_SEQ:
                    dpre = tl.where((docs == first_doc)[:, None], dpre, 0.0)
                for i in tl.static_range(WIDTH - 1):
                    coef = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
                    for k in tl.static_range(i + 1):
                        w_k = tl.load(weight_ptr + cols * stride_w_d + k * stride_w_k, mask=col_ok, other=0.0)
                        coef = tl.where((local == i - k)[:, None], w_k.to(tl.float32)[None, :], coef)
                    dinit = tl.sum(coef * dpre, axis=0)
                    if HAS_DFINAL:
                        # with l < w-1 the final state still holds initial row i, as its row i - l
                        keep = col_ok & (i >= seqlen)
                        if HAS_SEQ:
                            keep = keep & (first_doc == last_doc)
                        dinit += tl.load(dfinal_ptr + batch * stride_dfinal_b + (i - seqlen) * stride_dfinal_l
                                         + cols * stride_dfinal_d, mask=keep, other=0.0).to(tl.float32)
                    tl.store(dinit_ptr + batch * stride_dinit_b + i * stride_dinit_l + cols * stride_dinit_d,
                             dinit.to(dinit_ptr.dtype.element_ty), mask=col_ok)

    part = batch * tl.num_programs(1) + pid_l
    if HAS_BIAS:
        tl.store(dbias_part_ptr + part * dim + cols, dbias, mask=col_ok)
    tl.store(dweight_part_ptr + (part * WIDTH + taps_idx[:, None]) * dim + cols[None, :], dweight,
             mask=(taps_idx < WIDTH)[:, None] & col_ok[None, :])


# Tile sizes, read at each call (tests shrink them to span several tiles at small lengths).
# Chosen from register counts of the sm_90 compile (no spills, >= 2 CTAs per SM): forward
# 16 values per thread per tile (about 80 registers); backward 8 (about 125: dpre, the
# activation, dx and the gather's index are live together). Long backward tiles keep the
# dweight/dbias partials near 5% of the bytes moved; BWD_TILES > 1 tiles per program would
# cut that further but its accumulators cost ~50 registers (one CTA per SM).
FWD_BLOCK_L, FWD_BLOCK_D, FWD_WARPS = 64, 64, 8
BWD_BLOCK_L, BWD_BLOCK_D, BWD_WARPS, BWD_TILES = 128, 16, 8, 1


def _strides(t, n):
    return t.stride() if t is not None else (0,) * n


def _block_d(dim, widest):
    return min(widest, max(16, triton.next_power_of_2(dim)))


def conv1d_fwd(x, weight, bias=None, initial_state=None, seq_idx=None, activation="silu",
               return_final_state=False, block_l=None, block_d=None, num_warps=None):
    # x: (b, l, d)  weight: (d, w)  bias: (d,)  initial_state: (b, w-1, d)  seq_idx: (b, l)
    # -> out (b, l, d) and final_state (b, w-1, d) or None, both in x's dtype
    b, l, d = x.shape
    width = weight.shape[1]
    block_l, block_d = block_l or FWD_BLOCK_L, block_d or _block_d(d, FWD_BLOCK_D)
    out = torch.empty(b, l, d, device=x.device, dtype=x.dtype)
    final = torch.empty(b, width - 1, d, device=x.device, dtype=x.dtype) if return_final_state else None
    grid = (triton.cdiv(d, block_d), triton.cdiv(l, block_l), b)
    _conv1d_fwd_kernel[grid](
        x, weight, bias, initial_state, seq_idx, out, final, l, d,
        *x.stride(), *weight.stride(), *_strides(initial_state, 3), *_strides(seq_idx, 2),
        *out.stride(), *_strides(final, 3),
        WIDTH=width, SILU=activation == "silu", HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None,
        HAS_SEQ=seq_idx is not None, HAS_FINAL=return_final_state, BLOCK_L=block_l, BLOCK_D=block_d,
        BLOCK_STATE=triton.next_power_of_2(width - 1), num_warps=num_warps or FWD_WARPS,
    )
    return out, final


def conv1d_bwd(dout, dfinal, x, weight, bias=None, initial_state=None, seq_idx=None, activation="silu",
               block_l=None, block_d=None, num_warps=None, tiles_per_program=None):
    # dout: (b, l, d)  dfinal: (b, w-1, d) or None  ->  dx, dweight, dbias (or None), dinit (or None),
    # each in its input's dtype
    b, l, d = x.shape
    width = weight.shape[1]
    block_l, block_d = block_l or BWD_BLOCK_L, block_d or _block_d(d, BWD_BLOCK_D)
    if block_l < 2 * (width - 1):
        raise ValueError(f"block_l={block_l} must cover twice the conv's history (width {width})")
    tiles = triton.cdiv(l, block_l - (width - 1))
    # a power of two: few compiled variants
    tiles_per_program = min(tiles_per_program or BWD_TILES, triton.next_power_of_2(tiles))
    programs = triton.cdiv(tiles, tiles_per_program)
    dx = torch.empty(b, l, d, device=x.device, dtype=x.dtype)
    dweight_part = torch.empty(b, programs, width, d, device=x.device, dtype=torch.float32)
    dbias_part = torch.empty(b, programs, d, device=x.device, dtype=torch.float32) if bias is not None else None
    dinit = torch.empty_like(initial_state) if initial_state is not None else None
    grid = (triton.cdiv(d, block_d), programs, b)
    _conv1d_bwd_kernel[grid](
        x, weight, bias, initial_state, seq_idx, dout, dfinal, dx, dweight_part, dbias_part, dinit, l, d,
        *x.stride(), *weight.stride(), *_strides(initial_state, 3), *_strides(seq_idx, 2),
        *dout.stride(), *_strides(dfinal, 3), *dx.stride(), *_strides(dinit, 3),
        WIDTH=width, SILU=activation == "silu", HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None,
        HAS_SEQ=seq_idx is not None, HAS_DFINAL=dfinal is not None, BLOCK_L=block_l, BLOCK_D=block_d,
        TILES=tiles_per_program, num_warps=num_warps or BWD_WARPS,
    )
    dweight = dweight_part.sum(dim=(0, 1)).t().to(weight.dtype)
    dbias = dbias_part.sum(dim=(0, 1)).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias, dinit
