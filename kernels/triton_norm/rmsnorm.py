"""Gated grouped RMSNorm: forward and backward kernels and launchers.

Per row and group of G channels (the gate goes in before the norm, docs/design-notes.md):
    h = x · silu(z),   r = 1 / sqrt(mean_G(h²) + eps),   out = h · r · weight
Backward, with g = weight · dout:
    dh = r · g - h · r³ · mean_G(h · g)
    dx = dh · silu(z),   dz = dh · x · silu'(z),   dweight = sum_rows dout · h · r
All math in fp32; nothing is saved but the inputs (backward recomputes h and r, which costs
no extra memory traffic: it reads x and z anyway). A tile is BLOCK_M rows of one group.
"""

import torch
import triton
import triton.language as tl

from ..host_math import cdiv, next_power_of_2


@triton.jit
def _load(ptr, rows, cols, mask, stride_row, stride_col):
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)


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


@triton.jit
def _rmsnorm_gated_fwd_kernel(
    x_ptr, z_ptr, weight_ptr, out_ptr, n_rows, group_size, eps,
    stride_x_row, stride_x_col, stride_z_row, stride_z_col, stride_out_row, stride_out_col,
    HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
):
    # x, z, out: (m, d)  weight: (d,); one program per (BLOCK_M rows, group)
    pid_m, group = tl.program_id(0), tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    in_group = tl.arange(0, BLOCK_G)
    cols = group * group_size + in_group
    mask = (rows < n_rows)[:, None] & (in_group < group_size)[None, :]
    x = _load(x_ptr, rows, cols, mask, stride_x_row, stride_x_col)
    z = x
    if HAS_Z:
        z = _load(z_ptr, rows, cols, mask, stride_z_row, stride_z_col)
    _, _, h, _ = _gate(x, z, HAS_Z)
    rstd = tl.math.rsqrt(tl.sum(h * h, axis=1) / group_size + eps)
    weight = tl.load(weight_ptr + cols, mask=in_group < group_size, other=0.0).to(tl.float32)
    out = h * rstd[:, None] * weight[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out_row + cols[None, :] * stride_out_col,
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_gated_bwd_kernel(
    x_ptr, z_ptr, weight_ptr, dout_ptr, dx_ptr, dz_ptr, dweight_part_ptr, n_rows, dim, group_size, eps,
    stride_x_row, stride_x_col, stride_z_row, stride_z_col, stride_dout_row, stride_dout_col,
    stride_dx_row, stride_dx_col, stride_dz_row, stride_dz_col,
    HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, TILES: tl.constexpr,
):
    # dout, dx, dz: (m, d)  dweight_part: (programs along m, d) fp32. One program takes
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
    next_dout = _load(dout_ptr, next_rows, cols, next_mask, stride_dout_row, stride_dout_col)
    for tile in range(TILES):
        rows, mask, x, z, dout = next_rows, next_mask, next_x, next_z, next_dout
        # issue the next tile's loads before this tile's math: one or two programs fit an SM,
        # so nothing else would hide the load latency
        next_rows = rows + BLOCK_M
        next_mask = (next_rows < n_rows)[:, None] & col_ok[None, :] & (tile + 1 < TILES)
        next_x = _load(x_ptr, next_rows, cols, next_mask, stride_x_row, stride_x_col)
        if HAS_Z:
            next_z = _load(z_ptr, next_rows, cols, next_mask, stride_z_row, stride_z_col)
        next_dout = _load(dout_ptr, next_rows, cols, next_mask, stride_dout_row, stride_dout_col)

        x, z, h, sig = _gate(x, z, HAS_Z)
        dout = dout.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(h * h, axis=1) / group_size + eps)
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
        tl.store(dx_ptr + rows[:, None] * stride_dx_row + cols[None, :] * stride_dx_col,
                 dx.to(dx_ptr.dtype.element_ty), mask=mask)
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


def rmsnorm_gated_fwd(x, z, weight, eps, group_size, out_dtype=None):
    # x, z: (m, d)  weight: (d,)  ->  out: (m, d) in out_dtype (default x's)
    n_rows, dim = x.shape
    block_m, block_g, num_warps, _, _ = _blocks(n_rows, group_size)
    out = torch.empty(n_rows, dim, device=x.device, dtype=out_dtype or x.dtype)
    grid = (cdiv(n_rows, block_m), dim // group_size)
    _rmsnorm_gated_fwd_kernel[grid](
        x, z, weight, out, n_rows, group_size, eps,
        *x.stride(), *(z.stride() if z is not None else (0, 0)), *out.stride(),
        HAS_Z=z is not None, BLOCK_M=block_m, BLOCK_G=block_g, num_warps=num_warps,
    )
    return out


def rmsnorm_gated_bwd(dout, x, z, weight, eps, group_size, block_m=None, num_warps=None, tiles=None, dz_out=None):
    # dout, x, z: (m, d)  ->  dx (x's dtype), dz (z's dtype) or None, dweight (weight's dtype)
    # block_m, num_warps, tiles: overrides of the defaults, for bench_kernels.py --sweep-norm
    # dz_out: where to write dz (any strides, e.g. a column slice of a larger gradient)
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
    programs_m = cdiv(row_tiles, tiles)
    dweight_part = torch.empty(programs_m, dim, device=x.device, dtype=torch.float32)
    _rmsnorm_gated_bwd_kernel[(programs_m, ngroups)](
        x, z, weight, dout, dx, dz, dweight_part, n_rows, dim, group_size, eps,
        *x.stride(), *(z.stride() if z is not None else (0, 0)), *dout.stride(), *dx.stride(),
        *(dz.stride() if dz is not None else (0, 0)),
        HAS_Z=z is not None, BLOCK_M=block_m, BLOCK_G=block_g, TILES=tiles, num_warps=num_warps,
    )
    return dx, dz, dweight_part.sum(dim=0).to(weight.dtype)
