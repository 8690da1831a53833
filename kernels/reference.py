"""Slow, obviously-correct torch versions of the kernels: the tests' oracle and the CPU path.

SSD follows Dao & Gu 2024, "Transformers are SSMs" (Mamba-2). `ssd_sequential` states the
recurrence literally, one token at a time. `ssd_chunked` is the paper's SSD block
decomposition (§6), split into the stages of DESIGN §3 so the Triton kernels can be
compared stage by stage: `chunk_cumsum` → `chunk_state` → `state_passing` → `bmm_chunk`
+ `chunk_scan`. Stages take (b, l, ...) tensors of any length l and pad to whole chunks
themselves, like mamba_ssm's launchers.

Compute dtype: float64 if the main input is float64, else float32 (bf16 inputs allowed).
`seq_idx` holds document ids, non-decreasing along l (not checked: that would sync a GPU).
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "ssd_chunked", "ssd_sequential", "causal_conv1d", "rmsnorm_gated", "mixer_body", "cross_entropy_rows",
    "logsumexp_rows", "softmax_grad_rows",
    "chunk_cumsum", "chunk_state", "state_passing", "bmm_chunk", "chunk_scan",
]


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _upcast(t, dtype):
    return None if t is None else t.to(dtype)


def _expect_shape(name, t, shape, what):
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} {what}, found {tuple(t.shape)}")


def _expect_integer(name, t):
    if t is not None and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise ValueError(f"{name}: expected an integer tensor of document ids, found {t.dtype}")


# ----------------------------------------------------------------------------- SSD helpers

def _check_chunk_size(chunk_size):
    """The Triton entry points' chunk_size check (a bool is an int to Python: refused too)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, found {chunk_size!r}")


def _check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx):
    if x.dim() != 4 or x.shape[1] == 0:
        raise ValueError(f"x: expected shape (batch, seqlen >= 1, nheads, headdim), found {tuple(x.shape)}")
    b, l, h, p = x.shape
    _expect_shape("dt", dt, (b, l, h), "(batch, seqlen, nheads)")
    _expect_shape("A", A, (h,), "(nheads,)")
    if B.dim() != 4 or tuple(B.shape[:2]) != (b, l):
        raise ValueError(f"B: expected shape ({b}, {l}, ngroups, dstate) (batch, seqlen, ngroups, dstate), "
                         f"found {tuple(B.shape)}")
    g, n = B.shape[2:]
    if g == 0 or h % g:
        raise ValueError(f"B: ngroups={g} must divide nheads={h} (head i uses group i // (nheads // ngroups)); "
                         f"B has shape {tuple(B.shape)}, x has shape {tuple(x.shape)}")
    _expect_shape("C", C, (b, l, g, n), "(batch, seqlen, ngroups, dstate), like B")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"D: expected shape ({h},) or ({h}, {p}) (nheads,) or (nheads, headdim), "
                         f"found {tuple(D.shape)}")
    _expect_shape("z", z, (b, l, h, p), "(batch, seqlen, nheads, headdim), like x")
    _expect_shape("dt_bias", dt_bias, (h,), "(nheads,)")
    _expect_shape("initial_states", initial_states, (b, h, p, n), "(batch, nheads, headdim, dstate)")
    _expect_shape("seq_idx", seq_idx, (b, l), "(batch, seqlen)")
    _expect_integer("seq_idx", seq_idx)


def _process_dt(dt, dt_bias, dt_softplus, dt_limit):
    # dt: (b, l, h)  dt_bias: (h,) — the discretization step of each token and head
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(dt_limit[0], dt_limit[1])


def _heads(t, nheads):
    # t: (b, l, g, n) -> (b, l, h, n); head i reads group i // (h // g)
    return t.repeat_interleave(nheads // t.shape[2], dim=2)


def _skip_and_gate(y, x, D, z):
    # y, x, z: (b, l, h, p)  D: (h,) or (h, p). Gate after the D skip, as mamba_ssm's chunk_scan does.
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    return y


def _chunk(t, chunk_size):
    # t: (b, l, ...) -> (b, c, q, ...), zero-padded at the end to whole chunks
    b, l = t.shape[:2]
    pad = (-l) % chunk_size
    if pad:
        t = torch.cat([t, t.new_zeros((b, pad, *t.shape[2:]))], dim=1)
    return t.reshape(b, -1, chunk_size, *t.shape[2:])


def _chunk_seq_idx(seq_idx, chunk_size):
    # seq_idx: (b, l) -> (b, c, q); padded tokens join the last document, so they neither
    # end a document nor start one (their dt is 0: they leave the state unchanged)
    pad = (-seq_idx.shape[1]) % chunk_size
    seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1)
    return seq_idx.reshape(seq_idx.shape[0], -1, chunk_size)


# ----------------------------------------------------------------------------- SSD stages

def chunk_cumsum(dt, A, chunk_size, dt_bias=None, dt_softplus=True, dt_limit=(0.0, math.inf)):
    # dt: (b, l, h)  A, dt_bias: (h,)  ->  dt_chunks, dA_cumsum: (b, h, c, q)
    dt = _process_dt(dt, dt_bias, dt_softplus, dt_limit)
    # Pad after processing: a padded token has dt = 0, i.e. no decay (exp(0) = 1) and no input.
    dt_chunks = _chunk(dt, chunk_size).permute(0, 3, 1, 2)
    # log of the decay from the chunk start through token q: sum_{s<=q} A·dt_s (paper §6)
    dA_cumsum = torch.cumsum(dt_chunks * A[:, None, None], dim=-1)
    return dt_chunks, dA_cumsum


def chunk_state(B, x, dt, dA_cumsum, seq_idx=None):
    # B: (b, l, g, n)  x: (b, l, h, p)  dt, dA_cumsum: (b, h, c, q)  seq_idx: (b, l)
    # -> states: (b, c, h, p, n), each chunk's final state from its own tokens, started at zero
    # (the "right factor" B of the paper's low-rank off-diagonal blocks, §6)
    chunk_size, h = dt.shape[-1], x.shape[2]
    x_chunks = _chunk(x, chunk_size)                 # (b, c, q, h, p)
    B_chunks = _chunk(_heads(B, h), chunk_size)      # (b, c, q, h, n)
    # token s reaches the chunk end decayed by exp(sum_{s<t<=end} A·dt_t), and enters scaled by dt_s
    weight = torch.exp(dA_cumsum[..., -1:] - dA_cumsum) * dt
    if seq_idx is not None:
        # only the chunk's last document survives to its end: earlier ones were reset
        docs = _chunk_seq_idx(seq_idx, chunk_size)
        weight = weight * (docs == docs[..., -1:])[:, None].to(weight.dtype)
    return torch.einsum("bhcq,bcqhn,bcqhp->bchpn", weight, B_chunks, x_chunks)


def state_passing(states, dA_chunk_end, initial_states=None, seq_idx=None, chunk_size=None):
    # states: (b, c, h, p, n)  dA_chunk_end: (b, h, c) (each chunk's total log-decay)
    # initial_states, final_states: (b, h, p, n)  seq_idx: (b, l)
    # -> states_in: (b, c, h, p, n), the state entering each chunk; and the final state.
    # The sequential scan over chunks: the paper's "middle factor" A of §6.
    if seq_idx is not None and chunk_size is None:
        raise ValueError("state_passing: seq_idx needs chunk_size to find each chunk's last token")
    carried = initial_states if initial_states is not None else torch.zeros_like(states[:, 0])
    if seq_idx is not None:
        chunk_end_docs = _chunk_seq_idx(seq_idx, chunk_size)[..., -1]   # (b, c)
        previous_doc = seq_idx[:, 0]   # the initial state belongs to the first document
    states_in = []
    for c in range(states.shape[1]):
        states_in.append(carried)
        scale = torch.exp(dA_chunk_end[:, :, c])   # (b, h)
        if seq_idx is not None:
            # a document ended inside (or right before) this chunk: the carried state dies
            same_doc = (chunk_end_docs[:, c] == previous_doc)[:, None]
            scale = torch.where(same_doc, scale, torch.zeros_like(scale))
            previous_doc = chunk_end_docs[:, c]
        carried = scale[..., None, None] * carried + states[:, c]
    return torch.stack(states_in, dim=1), carried


def bmm_chunk(C, B, chunk_size):
    # C, B: (b, l, g, n)  ->  CB: (b, c, g, q, s), q the target token, s the source (per group,
    # shared by the group's heads). Unmasked: chunk_scan applies the causal and document masks.
    return torch.einsum("bcqgn,bcsgn->bcgqs", _chunk(C, chunk_size), _chunk(B, chunk_size))


def chunk_scan(CB, x, dt, dA_cumsum, C, states_in, D=None, z=None, seq_idx=None):
    # CB: (b, c, g, q, s)  x, z: (b, l, h, p)  dt, dA_cumsum: (b, h, c, q)  C: (b, l, g, n)
    # states_in: (b, c, h, p, n)  D: (h,) or (h, p)  seq_idx: (b, l)  ->  y: (b, l, h, p)
    b, l, h, p = x.shape
    chunk_size = dt.shape[-1]
    # Diagonal blocks (§6): y_q = sum_{s<=q} C_q·B_s · exp(dA_cumsum_q - dA_cumsum_s) · dt_s · x_s,
    # over sources s of q's own document. Fill the exponent with -inf where masked before exp:
    # above the diagonal it is positive and could overflow, and inf·0 would poison the gradients.
    visible = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    if seq_idx is not None:
        docs = _chunk_seq_idx(seq_idx, chunk_size)                           # (b, c, q)
        visible = visible & (docs[..., :, None] == docs[..., None, :])[:, None]   # (b, 1, c, q, s)
    log_decay = (dA_cumsum[..., :, None] - dA_cumsum[..., None, :]).masked_fill(~visible, -math.inf)
    scores = (CB.repeat_interleave(h // CB.shape[2], dim=2)          # (b, c, h, q, s)
              * torch.exp(log_decay).transpose(1, 2)
              * dt.transpose(1, 2)[..., None, :])
    y = torch.einsum("bchqs,bcshp->bcqhp", scores, _chunk(x, chunk_size))
    # Off-diagonal blocks: C_q reads the state carried into the chunk, decayed from the chunk start.
    state_decay = torch.exp(dA_cumsum)   # (b, h, c, q)
    if seq_idx is not None:
        # the carried state belongs to the document of the token before the chunk
        doc_before = torch.cat([seq_idx[:, :1], docs[:, :-1, -1]], dim=1)   # (b, c)
        state_decay = state_decay * (docs == doc_before[..., None])[:, None].to(state_decay.dtype)
    C_chunks = _chunk(_heads(C, h), chunk_size)   # (b, c, q, h, n)
    y = y + torch.einsum("bcqhn,bchpn,bhcq->bcqhp", C_chunks, states_in, state_decay)
    y = y.reshape(b, -1, h, p)[:, :l]
    return _skip_and_gate(y, x, D, z)


# ----------------------------------------------------------------------------- SSD

def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=True,
                dt_limit=(0.0, math.inf), initial_states=None, seq_idx=None, return_final_states=False):
    """Mamba-2 SSD by the paper's chunked block decomposition; same result as `ssd_sequential`.

    Returns y (b, l, h, p) in x's dtype, and with `return_final_states` also the state after
    the last token (b, h, p, n) in the compute dtype.
    """
    # x, z: (b, l, h, p)  dt: (b, l, h)  A, dt_bias: (h,)  B, C: (b, l, g, n)  D: (h,) | (h, p)
    # initial_states: (b, h, p, n)  seq_idx: (b, l)
    _check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, found {chunk_size!r}")
    cdt = _compute_dtype(x)
    xc, dt, A, B, C, D, z, dt_bias, initial_states = (
        _upcast(t, cdt) for t in (x, dt, A, B, C, D, z, dt_bias, initial_states))

    dt_chunks, dA_cumsum = chunk_cumsum(dt, A, chunk_size, dt_bias, dt_softplus, dt_limit)
    states = chunk_state(B, xc, dt_chunks, dA_cumsum, seq_idx)
    states_in, final_states = state_passing(states, dA_cumsum[..., -1], initial_states, seq_idx, chunk_size)
    CB = bmm_chunk(C, B, chunk_size)
    y = chunk_scan(CB, xc, dt_chunks, dA_cumsum, C, states_in, D, z, seq_idx).to(x.dtype)
    return (y, final_states) if return_final_states else y


def ssd_sequential(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True,
                   dt_limit=(0.0, math.inf), initial_states=None, seq_idx=None, return_final_states=False):
    """Mamba-2 SSD as the literal recurrence, one token at a time (the oracle):

        h_t = exp(dt_t·A)·h_{t-1} + dt_t·(x_t ⊗ B_t),   y_t = C_t·h_t + D·x_t,   y_t *= silu(z_t)

    with h_{t-1} replaced by zero where seq_idx changes, and h_{-1} = initial_states.
    """
    # x, z, y: (b, l, h, p)  dt: (b, l, h)  A, dt_bias: (h,)  B, C: (b, l, g, n)  D: (h,) | (h, p)
    # initial_states, state: (b, h, p, n)  seq_idx: (b, l)
    _check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    b, l, h, p = x.shape
    cdt = _compute_dtype(x)
    xc, dt, A, B, C, D, z, dt_bias, initial_states = (
        _upcast(t, cdt) for t in (x, dt, A, B, C, D, z, dt_bias, initial_states))
    dt = _process_dt(dt, dt_bias, dt_softplus, dt_limit)
    B, C = _heads(B, h), _heads(C, h)

    state = initial_states if initial_states is not None else xc.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            new_doc = (seq_idx[:, t] != seq_idx[:, t - 1])[:, None, None, None]
            state = torch.where(new_doc, torch.zeros_like(state), state)
        decay = torch.exp(dt[:, t] * A)[..., None, None]                       # (b, h, 1, 1)
        state = decay * state + dt[:, t, :, None, None] * xc[:, t, :, :, None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = _skip_and_gate(torch.stack(ys, dim=1), xc, D, z).to(x.dtype)
    return (y, state) if return_final_states else y


# ----------------------------------------------------------------------------- conv1d, norm

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


def _check_norm_inputs(x, z, weight, group_size):
    """The gated norm's argument checks, shared with the Triton path; returns the group size."""
    d = x.shape[-1]
    group_size = d if group_size is None else group_size
    if group_size < 1 or d % group_size:
        raise ValueError(f"group_size: expected a positive divisor of x's last dim {d} "
                         f"(x has shape {tuple(x.shape)}), found {group_size}")
    _expect_shape("z", z, x.shape, "(like x)")
    _expect_shape("weight", weight, (d,), "(dim,)")
    return group_size


def rmsnorm_gated(x, z, weight, eps=1e-5, group_size=None, out_dtype=None):
    """RMSNorm per group of `group_size` channels of x·silu(z), times weight.

    The gate comes BEFORE the norm: mamba_ssm's `norm_before_gate=False` and transformers'
    `MambaRMSNormGated`. Statistics in float32 (float64 for float64 x), result in out_dtype
    (default x's dtype); the weight is applied in float32 before the cast, as mamba_ssm's
    kernel does.
    """
    # x, z, out: (..., d)  weight: (d,)
    d = x.shape[-1]
    group_size = _check_norm_inputs(x, z, weight, group_size)
    cdt = _compute_dtype(x)
    hidden = x.to(cdt)
    if z is not None:
        hidden = hidden * F.silu(z.to(cdt))
    groups = hidden.reshape(*x.shape[:-1], d // group_size, group_size)
    groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)
    return (groups.reshape(x.shape) * weight.to(cdt)).to(out_dtype or x.dtype)


def _check_add_norm_inputs(residual, update, weight):
    """add_rmsnorm's argument checks, shared with the Triton path -> how many parts the update
    comes in (1: a tensor like residual)."""
    parts = update.shape[0] if update.dim() == residual.dim() + 1 else 1
    _expect_shape("update", update, residual.shape if update.dim() == residual.dim() else (parts, *residual.shape),
                  "(like residual, or (parts, *residual's shape) partial sums of it)")
    _expect_shape("weight", weight, (residual.shape[-1],), "(dim,)")
    return parts


def add_rmsnorm(residual, update, weight, eps=1e-5, out_dtype=None):
    """A pre-norm block's residual add fused with the next norm: (residual + update, in their
    promoted dtype, and the RMSNorm of that sum times weight, in out_dtype (default the sum's)).

    The model adds each block's mixer output to the residual stream here, at the next block's
    norm (mamba_ssm's fused_add_norm), so that the stream is read and written once for both.
    The update may come as partial sums, (parts, *residual's shape): a row-parallel out_proj's
    terms from each tensor-parallel rank (mixer_body's out_scatter), added here in fp32 with
    the stream rather than by a separate kernel first."""
    # residual, both outputs: (..., d)  update: (..., d) | (parts, ..., d)  weight: (d,)
    _check_add_norm_inputs(residual, update, weight)
    if update.dim() == residual.dim():
        total = residual + update
    else:
        cdt = torch.promote_types(_compute_dtype(residual), _compute_dtype(update))
        total = (residual.to(cdt) + _SumOfTerms.apply(update, cdt)).to(torch.promote_types(residual.dtype,
                                                                                           update.dtype))
    return total, rmsnorm_gated(total, None, weight, eps, out_dtype=out_dtype)


class _SumOfTerms(torch.autograd.Function):
    """terms.sum(0) in dtype, whose backward hands every term the sum's gradient as one tensor
    (stride 0 along the terms, in the terms' dtype), as the Triton norm does: `parts_gradient`
    relies on it. Autograd's own sum and cast would give a copy per term."""

    @staticmethod
    def forward(ctx, terms, dtype):
        # terms: (parts, ...)  ->  (...) in dtype
        ctx.shape, ctx.dtype = terms.shape, terms.dtype
        return terms.to(dtype).sum(0)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype).expand(ctx.shape), None


# ----------------------------------------------------------------------------- the mixer body

class MixerSizes(NamedTuple):
    d_inner: int
    conv_dim: int
    nheads: int
    headdim: int
    ngroups: int
    d_state: int


def check_mixer_inputs(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_weight, ngroups, seq_idx):
    """The mixer body's argument checks, shared with the Triton path; returns its sizes, read
    off the weights."""
    d_inner, nheads, conv_dim = out_weight.shape[1], dt_bias.shape[0], conv_weight.shape[0]
    bc_dim = conv_dim - d_inner
    if ngroups < 1 or nheads % ngroups or d_inner % nheads or bc_dim <= 0 or bc_dim % (2 * ngroups):
        raise ValueError(f"mixer_body: inconsistent sizes: out_proj in {d_inner}, conv channels {conv_dim}, "
                         f"{nheads} heads, ngroups {ngroups} (expected conv channels = d_inner + 2·ngroups·d_state, "
                         "ngroups dividing nheads, nheads dividing d_inner)")
    width = d_inner + conv_dim + nheads
    if zxbcdt.dim() != 3 or zxbcdt.shape[-1] != width:
        raise ValueError(f"zxbcdt: expected shape (batch, seqlen, {width}) [z | x | B | C | dt], "
                         f"found {tuple(zxbcdt.shape)}")
    if conv_weight.dim() != 2 or not 2 <= conv_weight.shape[1] <= 4:
        raise ValueError(f"conv_weight: expected shape ({conv_dim}, width) with width in 2..4, "
                         f"found {tuple(conv_weight.shape)}")
    _expect_shape("conv_bias", conv_bias, (conv_dim,), "(conv channels,)")
    _expect_shape("A", A, (nheads,), "(nheads,)")
    if D is not None and tuple(D.shape) not in ((nheads,), (nheads, d_inner // nheads)):
        raise ValueError(f"D: expected shape ({nheads},) or ({nheads}, {d_inner // nheads}), found {tuple(D.shape)}")
    _expect_shape("norm_weight", norm_weight, (d_inner,), "(d_inner,)")
    _expect_shape("seq_idx", seq_idx, zxbcdt.shape[:2], "(batch, seqlen)")
    _expect_integer("seq_idx", seq_idx)
    return MixerSizes(d_inner, conv_dim, nheads, d_inner // nheads, ngroups, bc_dim // (2 * ngroups))


def mixer_body(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_weight, *, ngroups, chunk_size,
               norm_eps=1e-5, dt_limit=(0.0, math.inf), seq_idx=None, context_parallel=None,
               keep_activations=False, out_scatter=None):
    """A Mamba-2 mixer from in_proj's output to out_proj's, as mamba_ssm's `Mamba2` computes it:
    split [z | x | B | C | dt], causal conv + SiLU over [x | B | C], SSD with softplus(dt +
    dt_bias), the gated norm per group of norm(y·silu(z)), then out_proj (no bias) in y's dtype.

    context_parallel: for one piece of a sequence cut over ranks, the hook that links it to the
    pieces before it (`mamba_train.parallel.context_parallel.ContextParallel`): `halo(tail)`
    gives the conv the rows before the piece, and `state_in(final_state, log_decay)` the SSM
    state entering it, from this piece's state run from zero and its total log decay Σ A·dt.
    Here autograd differentiates both; the Triton op runs its own backward and also calls
    `halo_grad(dhalo)` (the gradient of this piece's tail) and `final_state_grad(dstate_in,
    log_decay)` (the gradient of this piece's final state, from the pieces after it).

    keep_activations: whether backward may keep the conv's and the gated norm's outputs rather
    than recompute them (the Triton op's choice of memory against time). These chained ops are
    differentiated by autograd, which keeps them either way.

    out_scatter: for an out_proj split by input columns over a group of ranks (tensor
    parallelism), the object that exchanges its product's rows between them, so that this rank
    gets every rank's term of its rows of the batch
    (`mamba_train.parallel.sequence_parallel.TokenSplit`): `matmul_parts(a, w_t)` gives
    this rank's rows of each rank's a @ w_t, and for backward `gather_matmul(g, w)` gives (every
    rank's rows of g, those @ w). The result is then those terms, (ranks, b / ranks, l, d_model),
    for add_rmsnorm to sum with the stream: it must reach the loss only through their sum."""
    # zxbcdt: (b, l, d_inner + conv_dim + h)  conv_weight: (conv_dim, w)  A, dt_bias: (h,)
    # D: (h,) | (h, p)  norm_weight: (d_inner,)  out_weight: (d_model, d_inner)
    # -> (b, l, d_model) | with out_scatter (ranks, b / ranks, l, d_model)
    s = check_mixer_inputs(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_weight, ngroups, seq_idx)
    b, l = zxbcdt.shape[:2]
    z, xBC, dt = zxbcdt.split((s.d_inner, s.conv_dim, s.nheads), dim=-1)
    halo = None if context_parallel is None else context_parallel.halo(xBC[:, l - (conv_weight.shape[1] - 1):])
    xBC = causal_conv1d(xBC, conv_weight, conv_bias, activation="silu", initial_state=halo, seq_idx=seq_idx)
    x, B, C = xBC.split((s.d_inner, ngroups * s.d_state, ngroups * s.d_state), dim=-1)
    x = x.reshape(b, l, s.nheads, s.headdim)
    B, C = B.reshape(b, l, ngroups, s.d_state), C.reshape(b, l, ngroups, s.d_state)
    ssd_args = dict(dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit, seq_idx=seq_idx)
    state_in = None
    if context_parallel is not None:
        _, zero_start_final = ssd_chunked(x, dt, A, B, C, chunk_size, return_final_states=True, **ssd_args)
        cdt = _compute_dtype(x)
        log_decay = (_process_dt(dt.to(cdt), dt_bias.to(cdt), True, dt_limit) * A.to(cdt)).sum(dim=1)   # (b, h)
        state_in = context_parallel.state_in(zero_start_final, log_decay)
    y = ssd_chunked(x, dt, A, B, C, chunk_size, D=D, initial_states=state_in, **ssd_args)
    y = rmsnorm_gated(y.reshape(b, l, s.d_inner), z, norm_weight, eps=norm_eps, group_size=s.d_inner // ngroups)
    if out_scatter is not None:
        return _ProductTerms.apply(y, out_weight, out_scatter)
    return F.linear(y, out_weight.to(y.dtype))


def parts_gradient(grad_parts):
    """The gradient of a sum's terms (mixer_body's with out_scatter) -> the sum's. The terms
    reach the loss only through their sum (add_rmsnorm), so each term's gradient is the sum's
    and autograd hands over one tensor for all of them (stride 0 along the terms)."""
    # grad_parts: (parts, ...)  ->  (...)
    if grad_parts.shape[0] > 1 and grad_parts.stride(0) != 0:
        raise RuntimeError("mixer_body with out_scatter returns the terms of a sum: they must reach the loss "
                           "only through their sum (kernels.add_rmsnorm adds them to the residual stream)")
    return grad_parts[0]


class _ProductTerms(torch.autograd.Function):
    """mixer_body's out_proj with out_scatter: this rank's rows of each rank's y @ weightᵀ."""

    @staticmethod
    def forward(ctx, y, weight, out_scatter):
        w = weight.to(y.dtype)
        ctx.save_for_backward(y, w)
        ctx.out_scatter, ctx.weight_dtype = out_scatter, weight.dtype
        return out_scatter.matmul_parts(y, w.t())

    @staticmethod
    def backward(ctx, grad):
        y, w = ctx.saved_tensors
        grad_full, grad_y = ctx.out_scatter.gather_matmul(parts_gradient(grad).to(y.dtype).contiguous(), w)
        grad_weight = (grad_full.flatten(0, -2).t() @ y.flatten(0, -2)).to(ctx.weight_dtype)
        return grad_y, grad_weight, None


def cross_entropy_rows(logits, labels, grad_scale=None):
    """Cross-entropy of each row (fp32 or wider), and with grad_scale its gradient in place.

    logits: (rows, vocab); labels: (rows,), negative for ignored rows (loss meaningless,
    gradient zero). With grad_scale (rows,), logits are overwritten by
    d(sum_r grad_scale[r] · loss[r]) / d logits = (softmax − one-hot) · grad_scale.
    """
    # logits: (r, v)  labels, grad_scale, loss: (r,)
    cdt = torch.promote_types(logits.dtype, torch.float32)
    values = logits.to(cdt)
    lse = torch.logsumexp(values, dim=-1)
    safe = labels.clamp_min(0).long()
    loss = lse - values.gather(1, safe[:, None]).squeeze(1)
    if grad_scale is not None:
        grad = torch.exp(values - lse[:, None])
        grad.scatter_add_(1, safe[:, None], torch.full_like(lse, -1.0)[:, None])
        grad *= grad_scale.to(cdt)[:, None] * (labels >= 0).to(cdt)[:, None]
        logits.copy_(grad)
    return loss


def logsumexp_rows(logits, labels):
    """The first half of cross_entropy_rows, for a vocabulary split over ranks: per row the
    log-sum-exp (fp32 or wider) and the logit at the label where 0 <= label < vocab, else 0.

    logits: (rows, vocab); labels: (rows,) → lse, target: (rows,)."""
    cdt = torch.promote_types(logits.dtype, torch.float32)
    values = logits.to(cdt)
    here = (labels >= 0) & (labels < logits.shape[1])
    target = values.gather(1, torch.where(here, labels, 0).long()[:, None]).squeeze(1)
    return torch.logsumexp(values, dim=-1), torch.where(here, target, 0.0)


def softmax_grad_rows(logits, labels, lse, grad_scale):
    """The second half: logits (rows, vocab) overwritten by (exp(logit − lse) − one-hot(label))
    · grad_scale per row, lse being the whole vocabulary's; a label outside [0, vocab) adds
    no one-hot (another rank holds it)."""
    cdt = torch.promote_types(logits.dtype, torch.float32)
    grad = torch.exp(logits.to(cdt) - lse.to(cdt)[:, None])
    here = (labels >= 0) & (labels < logits.shape[1])
    grad.scatter_add_(1, torch.where(here, labels, 0).long()[:, None], -here.to(cdt)[:, None])
    grad *= grad_scale.to(cdt)[:, None]
    logits.copy_(grad)
