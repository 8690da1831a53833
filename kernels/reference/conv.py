"""The causal depthwise conv1d over channels-last rows, with a carried state and document
resets."""

import torch
import torch.nn.functional as F

from .common import _compute_dtype, _expect_integer, _expect_shape


def _check_conv_inputs(x, weight, bias, activation, initial_state, seq_idx):
    """The conv's argument checks, shared with the Triton path (kernels.triton_conv)."""
    if activation not in ("silu", None):
        raise ValueError(f"activation: expected 'silu' or None, found {activation!r}")
    if x.dim() != 3:
        raise ValueError(f"x: expected shape (batch, seqlen, dim), found {tuple(x.shape)}")
    b, l, d = x.shape
    if weight.dim() != 2 or weight.shape[0] != d or not 2 <= weight.shape[1] <= 4:
        raise ValueError(f"weight: expected shape ({d}, width) (dim, width) with width in 2..4, "
                         f"found {tuple(weight.shape)}")
    _expect_shape("bias", bias, (d,), "(dim,)")
    _expect_shape("initial_state", initial_state, (b, weight.shape[1] - 1, d), "(batch, width - 1, dim)")
    _expect_shape("seq_idx", seq_idx, (b, l), "(batch, seqlen)")
    _expect_integer("seq_idx", seq_idx)


def causal_conv1d(x, weight, bias=None, activation="silu", initial_state=None,
                  return_final_state=False, seq_idx=None):
    """Depthwise causal conv over channels-last x, as mamba_ssm's causal_conv1d.

    out[b, t, c] = act(bias[c] + sum_k weight[c, k] · x[b, t - (w-1) + k, c]); rows before t=0
    come from initial_state. final_state is the last w-1 raw input rows (before activation),
    zeroed where they belong to an earlier document than the last (with seq_idx).
    """
    # x, out: (b, l, d)  weight: (d, w)  bias: (d,)  initial_state, final_state: (b, w-1, d)
    # seq_idx: (b, l)
    _check_conv_inputs(x, weight, bias, activation, initial_state, seq_idx)
    b, l, d = x.shape
    w = weight.shape[1]

    history = initial_state.to(x.dtype) if initial_state is not None else x.new_zeros(b, w - 1, d)
    rows = torch.cat([history, x], dim=1)   # (b, w-1+l, d): output t reads rows t..t+w-1
    cdt = _compute_dtype(x)
    rows_c, weight = rows.to(cdt), weight.to(cdt)
    if seq_idx is not None:
        # the initial_state rows continue the first document
        row_docs = torch.cat([seq_idx[:, :1].expand(-1, w - 1), seq_idx], dim=1)
    out = bias.to(cdt).expand(b, l, d) if bias is not None else rows_c.new_zeros(b, l, d)
    for k in range(w):
        tap = rows_c[:, k:k + l]
        if seq_idx is not None:
            # a tap from another document reads zero: each document starts from empty history
            tap = tap * (row_docs[:, k:k + l] == seq_idx)[..., None].to(cdt)
        out = out + weight[:, k] * tap
    if activation == "silu":
        out = F.silu(out)
    out = out.to(x.dtype)
    if not return_final_state:
        return out
    final_state = rows[:, l:]
    if seq_idx is not None:
        # the state continues the last document only: rows of an earlier document read as
        # zero (empty history), as the SSD's final state holds the last document alone
        final_state = final_state * (row_docs[:, l:] == seq_idx[:, -1:])[..., None].to(final_state.dtype)
    return out, final_state
