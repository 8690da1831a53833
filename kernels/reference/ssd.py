"""The SSD (Dao & Gu 2024, "Transformers are SSMs", Mamba-2). `ssd_sequential` states the
recurrence literally, one token at a time. `ssd_chunked` is the paper's SSD block decomposition
(§6), split into the stages of DESIGN §3 so the Triton kernels can be compared stage by stage:
`chunk_cumsum` → `chunk_state` → `state_passing` → `bmm_chunk` + `chunk_scan`. Stages take
(b, l, ...) tensors of any length l and pad to whole chunks themselves, like mamba_ssm's
launchers."""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .common import _compute_dtype, _expect_integer, _expect_shape, _upcast


# ----------------------------------------------------------------------------- SSD helpers

class WeightedStates(NamedTuple):
    """A state given as Σ_k w_k · states[k], not summed, with each weight given by its log:
    w_k = exp(Σ_u coef[k, u] · log_totals[u]) where reach[k] is 1, else 0. states (k, b, h, p,
    n), each head's p·n contiguous; log_totals (u, b, h), coef (k, u), reach (k, b), fp32.

    Context parallelism's gathered boundary states come so (ContextParallel's _async hooks):
    log_totals are the pieces' total log decays, gathered with them; coef says which pieces'
    decays lie between piece k and this one, reach whether a state passes at all (documents).
    The Triton state passing forms the weights and the sum as it loads the states
    (add_initial_state, add_final_state_grad): neither is written out and read back, and no
    small kernels run between the all-gather and the pass."""
    states: torch.Tensor
    log_totals: torch.Tensor
    coef: torch.Tensor
    reach: torch.Tensor

    def weights(self) -> torch.Tensor:
        # (k, b, h) fp32; a broadcast product and sum, not an einsum: autocast would run that in
        # bf16, and a log weight of -30 would come back off by 0.06 (its weight by 6%)
        log_weight = (self.coef[:, :, None, None] * self.log_totals[None]).sum(1)
        # -inf where no state passes: exp gives 0, and under autograd its gradient stays 0
        # (where a product with 0 after the exp would meet an overflowed exp and give nan)
        return torch.exp(log_weight.masked_fill(self.reach[..., None] == 0, float("-inf")))

    def sum(self) -> torch.Tensor:
        # (b, h, p, n) in fp32 at least, whatever the states' dtype (they may have travelled in bf16)
        return (self.weights()[..., None, None] * self.states.to(torch.promote_types(self.states.dtype,
                                                                                       torch.float32))).sum(0)


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
