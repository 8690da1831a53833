"""Gated grouped RMSNorm: forward and backward kernels and launchers.

Per row and group of G channels (the gate goes in before the norm, docs/design-notes.md):
    h = x · silu(z),   r = 1 / sqrt(mean_G(h²) + eps),   out = h · r · weight
Backward, with g = weight · dout:
    dh = r · g - h · r³ · mean_G(h · g)
    dx = dh · silu(z),   dz = dh · x · silu'(z),   dweight = sum_rows dout · h · r
All math in fp32; nothing is saved but the inputs (backward recomputes h and r, which costs
no extra memory traffic: it reads x and z anyway). A tile is BLOCK_M rows of one group.

With an update (the residual add fused into the norm after it, kernels.add_rmsnorm; no gate):
forward reads the residual stream x and the update u (or its partial sums, tensor parallelism's
terms), writes x + u and the norm of that;
backward adds the gradient arriving at x + u from later blocks to the norm's, and writes the
sum twice: for the residual (its dtype, fp32) and for the update (its dtype, bf16). An add
and a norm apart move 44 bytes an element over forward and backward (fp32 stream, bf16
update and norm); fused, 28.
"""

import torch
import triton
import triton.language as tl

from ..cached_launch import cached_launch
from ..column_sum import column_sum
from ..host_math import cdiv, next_power_of_2


@triton.jit
def _load(ptr, rows, cols, mask, stride_row, stride_col):
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)


@triton.jit
def _load_terms(ptr, rows, cols, mask, stride_part, stride_row, stride_col, PARTS: tl.constexpr):
    # a tile of one tensor as stored, or with PARTS > 1 the fp32 sum of PARTS tensors' tiles,
    # a pointer stepped term by term (no product part · stride to overflow 32 bits)
    total = _load(ptr, rows, cols, mask, stride_row, stride_col)
    if PARTS > 1:
        total = total.to(tl.float32)
        part_ptr = ptr
        for _ in tl.static_range(PARTS - 1):
            part_ptr += stride_part
            total += _load(part_ptr, rows, cols, mask, stride_row, stride_col).to(tl.float32)
    return total


@triton.jit
def _gate(x, z, HAS_Z: tl.constexpr):
    # -> x, z (or x again), h = x·silu(z) and sig = σ(z) (or x again) as fp32 tiles
    x = x.to(tl.float32)
    if HAS_Z:
        z = z.to(tl.float32)
        sig = tl.sigmoid(z)
        h = x * z * sig
    else:
        z, h, sig = x, x, x
    return x, z, h, sig


@cached_launch
@triton.jit
def _rmsnorm_gated_fwd_kernel(
    x_ptr, z_ptr, update_ptr, weight_ptr, out_ptr, sum_ptr, rstd_ptr, n_rows, group_size, eps,
    stride_x_row, stride_x_col, stride_z_row, stride_z_col, stride_u_part, stride_u_row, stride_u_col,
    stride_out_row, stride_out_col, stride_sum_row, stride_sum_col,
    HAS_Z: tl.constexpr, HAS_UPDATE: tl.constexpr, UPDATE_PARTS: tl.constexpr, HAS_RSTD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
):
    # x, z, out, sum: (m, d)  update: (UPDATE_PARTS, m, d), summed  weight: (d,)  rstd: (groups,
    # m) fp32, written with HAS_RSTD; one program per (BLOCK_M rows, group)
    pid_m, group = tl.program_id(0), tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    in_group = tl.arange(0, BLOCK_G)
    cols = group * group_size + in_group
    mask = (rows < n_rows)[:, None] & (in_group < group_size)[None, :]
    x = _load(x_ptr, rows, cols, mask, stride_x_row, stride_x_col)
    if HAS_UPDATE:
        # the norm reads the sum as stored (rounded to its dtype), as the unfused ops would
        x = x.to(tl.float32)
        # a pointer stepped term by term: no product part · stride to overflow 32 bits
        part_ptr = update_ptr
        for _ in tl.static_range(UPDATE_PARTS):
            x += _load(part_ptr, rows, cols, mask, stride_u_row, stride_u_col).to(tl.float32)
            part_ptr += stride_u_part
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + rows[:, None] * stride_sum_row + cols[None, :] * stride_sum_col, x, mask=mask)
    z = x
    if HAS_Z:
        z = _load(z_ptr, rows, cols, mask, stride_z_row, stride_z_col)
    _, _, h, _ = _gate(x, z, HAS_Z)
    rstd = tl.math.rsqrt(tl.sum(h * h, axis=1) / group_size + eps)
    if HAS_RSTD:
        tl.store(rstd_ptr + group * n_rows + rows, rstd, mask=rows < n_rows)
    weight = tl.load(weight_ptr + cols, mask=in_group < group_size, other=0.0).to(tl.float32)
    out = h * rstd[:, None] * weight[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out_row + cols[None, :] * stride_out_col,
             out.to(out_ptr.dtype.element_ty), mask=mask)


@cached_launch
@triton.jit
def _rmsnorm_gated_bwd_kernel(
    x_ptr, z_ptr, weight_ptr, dout_ptr, dsum_ptr, rstd_ptr, dx_ptr, dz_ptr, dupdate_ptr, out_ptr, dweight_part_ptr,
    n_rows, dim, group_size, eps,
    stride_x_row, stride_x_col, stride_z_row, stride_z_col, stride_dout_part, stride_dout_row, stride_dout_col,
    stride_dsum_row, stride_dsum_col, stride_dx_row, stride_dx_col, stride_dz_row, stride_dz_col,
    stride_du_row, stride_du_col, stride_out_row, stride_out_col,
    HAS_Z: tl.constexpr, HAS_DSUM: tl.constexpr, HAS_DUPDATE: tl.constexpr, HAS_RSTD: tl.constexpr,
    HAS_OUT: tl.constexpr, DOUT_PARTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
    TILES: tl.constexpr,
):
    # dout: (DOUT_PARTS, m, d), summed  dsum, dx, dz, dupdate, out: (m, d)  dweight_part:
    # (programs along m, d) fp32. dsum: the gradient of the residual sum x from later uses,
    # added to dx; dupdate: dx again, in the update's dtype. rstd (groups, m): the forward's,
    # read instead of recomputed; out: the forward's output again (the same bits with the
    # forward's rstd). One program takes
    # TILES · BLOCK_M consecutive rows of one group and writes one dweight partial, so the
    # partials stay small next to the tensors read.
    pid_m, group = tl.program_id(0), tl.program_id(1)
    in_group = tl.arange(0, BLOCK_G)
    cols = group * group_size + in_group
    col_ok = in_group < group_size
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dweight = tl.zeros((BLOCK_G,), dtype=tl.float32)
    next_rows = (pid_m * TILES * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    next_mask = (next_rows < n_rows)[:, None] & col_ok[None, :]
    next_x = _load(x_ptr, next_rows, cols, next_mask, stride_x_row, stride_x_col)
    next_z = next_x
    if HAS_Z:
        next_z = _load(z_ptr, next_rows, cols, next_mask, stride_z_row, stride_z_col)
    next_dout = _load_terms(dout_ptr, next_rows, cols, next_mask, stride_dout_part, stride_dout_row,
                            stride_dout_col, DOUT_PARTS)
    next_dsum = next_dout
    if HAS_DSUM:
        next_dsum = _load(dsum_ptr, next_rows, cols, next_mask, stride_dsum_row, stride_dsum_col)
    for tile in range(TILES):
        rows, mask, x, z, dout, dsum = next_rows, next_mask, next_x, next_z, next_dout, next_dsum
        # issue the next tile's loads before this tile's math: one or two programs fit an SM,
        # so nothing else would hide the load latency
        next_rows = rows + BLOCK_M
        next_mask = (next_rows < n_rows)[:, None] & col_ok[None, :] & (tile + 1 < TILES)
        next_x = _load(x_ptr, next_rows, cols, next_mask, stride_x_row, stride_x_col)
        if HAS_Z:
            next_z = _load(z_ptr, next_rows, cols, next_mask, stride_z_row, stride_z_col)
        next_dout = _load_terms(dout_ptr, next_rows, cols, next_mask, stride_dout_part, stride_dout_row,
                                stride_dout_col, DOUT_PARTS)
        if HAS_DSUM:
            next_dsum = _load(dsum_ptr, next_rows, cols, next_mask, stride_dsum_row, stride_dsum_col)

        x, z, h, sig = _gate(x, z, HAS_Z)
        dout = dout.to(tl.float32)
        if HAS_RSTD:
            rstd = tl.load(rstd_ptr + group * n_rows + rows, mask=rows < n_rows, other=1.0)
        else:
            rstd = tl.math.rsqrt(tl.sum(h * h, axis=1) / group_size + eps)
        if HAS_OUT:   # the forward's expression on the forward's values
            out = h * rstd[:, None] * weight[None, :]
            tl.store(out_ptr + rows[:, None] * stride_out_row + cols[None, :] * stride_out_col,
                     out.to(out_ptr.dtype.element_ty), mask=mask)
        dweight += tl.sum(dout * h * rstd[:, None], axis=0)
        g = dout * weight[None, :]
        mean_hg = tl.sum(h * g, axis=1) / group_size
        dh = rstd[:, None] * g - h * (rstd * rstd * rstd * mean_hg)[:, None]
        if HAS_Z:
            dx = dh * z * sig
            dz = dh * x * sig * (1.0 + z * (1.0 - sig))   # silu'(z) = σ(z)·(1 + z·(1 - σ(z)))
            tl.store(dz_ptr + rows[:, None] * stride_dz_row + cols[None, :] * stride_dz_col,
                     dz.to(dz_ptr.dtype.element_ty), mask=mask)
        else:
            dx = dh
        if HAS_DSUM:
            dx += dsum.to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * stride_dx_row + cols[None, :] * stride_dx_col,
                 dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DUPDATE:
            tl.store(dupdate_ptr + rows[:, None] * stride_du_row + cols[None, :] * stride_du_col,
                     dx.to(dupdate_ptr.dtype.element_ty), mask=mask)
    tl.store(dweight_part_ptr + pid_m * dim + cols, dweight, mask=col_ok)


def _blocks(n_rows, group_size):
    # Forward: a tile of about 4096 elements, several rows of a narrow group, one row of a
    # wide one, 16 values per thread (about 50 registers on sm_90).
    # Backward: one row per tile down to groups of 512 channels, 8 values per thread (about
    # 100 registers: x, z, their gate, dout, dh live together). Several rows per tile made
    # each tile reduce dweight across warps: measured on an H100 (bench_kernels.py
    # --sweep-norm, (8, 2048) rows) at d1536 two rows per tile ran 0.256 ms, one row 0.129 ms.
    # Returns (forward rows, group tile, forward warps, backward rows, backward warps).
    block_g = next_power_of_2(group_size)
    if block_g > 65536:
        raise ValueError(f"group_size={group_size}: at most 65536 channels per group fit one tile")
    rows = next_power_of_2(n_rows)
    fwd_m = min(16, max(1, 4096 // block_g), rows)
    bwd_m = min(16, max(1, 512 // block_g), rows)
    return (fwd_m, block_g, min(16, max(1, fwd_m * block_g // 512)),
            bwd_m, min(16, max(1, bwd_m * block_g // 256)))


def _programs_per_sm(device):
    # backward grid target: a few programs per SM, enough to hide latency, few partials
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return 4 * sms


def _strides(t):
    return t.stride() if t is not None else (0, 0)


def rmsnorm_gated_fwd(x, z, weight, eps, group_size, out_dtype=None, update=None, rstd=None, out=None):
    # x, z, update: (m, d)  weight: (d,)  ->  out: (m, d) in out_dtype (default x's); with an
    # update (and no z), (x + update in their promoted dtype, out) instead, out the norm of the sum.
    # The update may come as partial sums (parts, m, d), added in fp32 with x.
    # rstd: a (groups, m) fp32 tensor to write each row's 1 / rms into, for rmsnorm_gated_bwd
    # out: where to write the norm (any strides, e.g. some rows of a larger tensor)
    n_rows, dim = x.shape
    block_m, block_g, num_warps, _, _ = _blocks(n_rows, group_size)
    if out is None:
        out = torch.empty(n_rows, dim, device=x.device, dtype=out_dtype or x.dtype)
    assert out.shape == (n_rows, dim) and out.dtype == (out_dtype or x.dtype), "out: (rows, d) in out_dtype"
    assert rstd is None or (rstd.shape == (dim // group_size, n_rows) and rstd.dtype == torch.float32
                            and rstd.is_contiguous()), "rstd: a contiguous (groups, rows) fp32 tensor"
    total = None
    if update is not None:
        assert z is None, "the residual add goes with the plain norm (no gate)"
        total = torch.empty(n_rows, dim, device=x.device, dtype=torch.promote_types(x.dtype, update.dtype))
    parts = update.unsqueeze(0) if update is not None and update.dim() == 2 else update
    grid = (cdiv(n_rows, block_m), dim // group_size)
    _rmsnorm_gated_fwd_kernel[grid](
        x, z, parts, weight, out, total, rstd, n_rows, group_size, eps,
        *x.stride(), *_strides(z), *(parts.stride() if parts is not None else (0, 0, 0)), *out.stride(),
        *_strides(total),
        HAS_Z=z is not None, HAS_UPDATE=update is not None, UPDATE_PARTS=1 if parts is None else parts.shape[0],
        HAS_RSTD=rstd is not None, BLOCK_M=block_m, BLOCK_G=block_g, num_warps=num_warps,
    )
    return out if update is None else (total, out)


def rmsnorm_gated_bwd(dout, x, z, weight, eps, group_size, block_m=None, num_warps=None, tiles=None, dz_out=None,
                      dsum=None, update_dtype=None, rstd=None, out=None, dupdate_out=None):
    # dout, x, z: (m, d)  ->  dx (x's dtype), dz (z's dtype) or None, dweight (weight's dtype);
    # dout may come as terms (parts, m, d) of the output's gradient, summed in fp32 as they load
    # block_m, num_warps, tiles: overrides of the defaults, for bench_kernels.py --sweep-norm
    # dz_out: where to write dz (any strides, e.g. a column slice of a larger gradient)
    # rstd: the forward's (rmsnorm_gated_fwd's rstd), read instead of recomputed; with it, out
    # (m, d) receives the forward's output again, bit for bit, from the values read anyway (a
    # caller that recomputes it for a weight gradient saves the forward's second read of x, z)
    # With the residual add fused in (rmsnorm_gated_fwd's update; x is then the sum): dsum, the
    # sum's gradient from its other uses (or None), is added to dx, and with update_dtype the
    # result is also written in that dtype (into dupdate_out where given, any strides): ->
    # (dx, dupdate), None, dweight
    n_rows, dim = x.shape
    ngroups = dim // group_size
    _, block_g, _, default_m, default_warps = _blocks(n_rows, group_size)
    block_m, num_warps = block_m or default_m, num_warps or default_warps
    row_tiles = cdiv(n_rows, block_m)
    want = cdiv(row_tiles * ngroups, _programs_per_sm(x.device))
    tiles = tiles or min(64, next_power_of_2(want))   # a power of two: few compiled variants
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dz = torch.empty_like(z, memory_format=torch.contiguous_format) if z is not None and dz_out is None else dz_out
    assert dz is None or (dz.shape == z.shape and dz.dtype == z.dtype), "dz_out must match z's shape and dtype"
    dupdate = None if update_dtype is None else \
        dupdate_out if dupdate_out is not None else torch.empty(n_rows, dim, device=x.device, dtype=update_dtype)
    assert dupdate is None or (dupdate.shape == (n_rows, dim) and dupdate.dtype == update_dtype), \
        "dupdate_out: (rows, d) in update_dtype"
    assert out is None or rstd is not None, "out (the forward's output again) needs the forward's rstd"
    assert rstd is None or (rstd.shape == (ngroups, n_rows) and rstd.dtype == torch.float32 and rstd.is_contiguous())
    programs_m = cdiv(row_tiles, tiles)
    dweight_part = torch.empty(programs_m, dim, device=x.device, dtype=torch.float32)
    dout_terms = dout if dout.dim() == 3 else dout.unsqueeze(0)
    _rmsnorm_gated_bwd_kernel[(programs_m, ngroups)](
        x, z, weight, dout_terms, dsum, rstd, dx, dz, dupdate, out, dweight_part, n_rows, dim, group_size, eps,
        *x.stride(), *_strides(z), *dout_terms.stride(), *_strides(dsum), *dx.stride(), *_strides(dz),
        *_strides(dupdate), *_strides(out),
        HAS_Z=z is not None, HAS_DSUM=dsum is not None, HAS_DUPDATE=dupdate is not None, HAS_RSTD=rstd is not None,
        HAS_OUT=out is not None, DOUT_PARTS=dout_terms.shape[0], BLOCK_M=block_m, BLOCK_G=block_g, TILES=tiles,
        num_warps=num_warps,
    )
    dweight = column_sum(dweight_part, torch.empty_like(weight, memory_format=torch.contiguous_format))
    return (dx if update_dtype is None else (dx, dupdate)), dz, dweight
