"""Context parallelism with state passing: the Mamba-2 paper's sequence parallelism (§8),
DESIGN §4 steps a–d.

The sequence is cut into cp contiguous pieces, one per rank. A Mamba-2 layer needs from
the ranks before it only (a) the last d_conv-1 conv input rows of the previous rank (the
halo) and (b) the SSM state entering its piece. The state is linear in the earlier
pieces: with h_s the final state of piece s run from a zero state and a_s its total decay,
the state entering rank r is  h_in = Σ_{s<r} (Π_{s<t<r} a_t) h_s  (Mamba-2's state
passing, one level up), and a zero-state run is corrected by  y_t += C_t·exp(Σ_{u≤t} A·dt_u)·h_in.
So each layer sends d_conv-1 rows to one neighbour and all-gathers (h_r, a_r): B·H·P·N
numbers per rank, independent of the sequence length.

Documents (`seq_idx`, ids of the whole sequence, sliced per rank): a state or a halo row
reaches only tokens of its own document; a document that starts exactly at a rank border
gets nothing. The kernels apply an initial state to the tokens whose seq_idx equals
seq_idx[:, 0], so the halo rows of other documents are zeroed here and the state is
zeroed where the border starts a document.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

# ----------------------------------------------------------------------------- collectives


class _AllGather(torch.autograd.Function):
    """all_gather_into_tensor along a new leading dim; backward reduce-scatters the
    gradient (every rank's loss may depend on every rank's piece)."""

    @staticmethod
    def forward(ctx, piece, group):
        # piece: (...) → gathered: (world, ...)
        ctx.group = group
        world = dist.get_world_size(group)
        # gloo wants the output concatenated along dim 0, not stacked: gather, then view
        gathered = piece.new_empty((world * piece.shape[0], *piece.shape[1:]))
        dist.all_gather_into_tensor(gathered, piece.contiguous(), group=group)
        return gathered.view(world, *piece.shape)

    @staticmethod
    def backward(ctx, grad):
        piece_grad = grad.new_empty(grad.shape[1:])
        dist.reduce_scatter_tensor(piece_grad, grad.reshape(-1, *grad.shape[2:]).contiguous(), group=ctx.group)
        return piece_grad, None


def all_gather_pieces(piece: torch.Tensor, group) -> torch.Tensor:
    return _AllGather.apply(piece, group)


def _exchange(send: torch.Tensor | None, send_to: int | None, recv_like: torch.Tensor, recv_from: int | None,
              group) -> torch.Tensor:
    """Send `send` to group rank send_to and receive a tensor like recv_like from recv_from
    (None: no partner; zeros are received). Posted together so neighbours cannot deadlock."""
    received = recv_like.new_zeros(recv_like.shape)  # contiguous, whatever recv_like is
    requests = []
    if recv_from is not None:
        requests.append(dist.irecv(received, group=group, group_src=recv_from))
    if send_to is not None:
        requests.append(dist.isend(send.contiguous(), group=group, group_dst=send_to))
    for request in requests:
        request.wait()
    return received


class _FromPreviousRank(torch.autograd.Function):
    """Rank r gets rank r-1's tensor (rank 0 gets zeros); backward sends the gradient back."""

    @staticmethod
    def forward(ctx, tail, group):
        # tail: (batch, d_conv-1, conv_dim) → halo of the same shape, from the previous rank
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        ctx.group, ctx.rank, ctx.world = group, rank, world
        return _exchange(tail, rank + 1 if rank + 1 < world else None, tail, rank - 1 if rank > 0 else None, group)

    @staticmethod
    def backward(ctx, halo_grad):
        rank, world = ctx.rank, ctx.world
        tail_grad = _exchange(halo_grad, rank - 1 if rank > 0 else None, halo_grad,
                              rank + 1 if rank + 1 < world else None, ctx.group)
        return tail_grad, None


# ----------------------------------------------------------------------------- the mixer hook


class ContextParallel:
    """The mixer's context-parallel hook (Mamba2Mixer.context_parallel). One object is
    shared by every layer; `begin(seq_idx)` records, once per forward, where documents
    cross this rank's borders (one small all-gather of ids, not per layer)."""

    def __init__(self, group, d_conv: int):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.halo_len = d_conv - 1
        self._halo_mask = self._joins = self._continues = None

    @torch.no_grad()
    def begin(self, seq_idx: torch.Tensor | None, batch: int, device) -> None:
        # seq_idx: (batch, local_len) this rank's slice of the whole sequence's document ids
        if seq_idx is None:  # one document throughout: everything continues
            seq_idx = torch.zeros(batch, self.halo_len + 1, dtype=torch.long, device=device)
        seq_idx = seq_idx.long()
        ends = torch.cat([seq_idx[:, :1], seq_idx[:, -self.halo_len:]], dim=1)   # (b, 1 + halo)
        every = all_gather_pieces(ends, self.group)                              # (cp, b, 1 + halo)
        first, tails = every[:, :, 0], every[:, :, 1:]                           # (cp, b), (cp, b, halo)
        last = tails[:, :, -1]
        # joins[s]: rank s's first token continues rank s-1's last document
        joins = torch.zeros_like(first, dtype=torch.bool)
        joins[1:] = first[1:] == last[:-1]
        self._joins = joins                                                      # (cp, b)
        self._continues = first == last                                          # no document starts inside
        previous_tail = tails[self.rank - 1] if self.rank > 0 else torch.full_like(tails[0], -1)
        self._halo_mask = previous_tail == first[self.rank][:, None]             # (b, halo)

    def conv_halo(self, xBC: torch.Tensor, state) -> torch.Tensor:
        # xBC: (batch, local_len, conv_dim) before the conv → halo: (batch, d_conv-1, conv_dim)
        if state is not None:
            raise ValueError("context parallelism runs whole sequences from the start; it takes no carried state")
        if self._halo_mask is None:
            raise RuntimeError("ContextParallel.begin(seq_idx) must run before the layers (ParallelMamba2LM does)")
        halo = _FromPreviousRank.apply(xBC[:, -self.halo_len:], self.group)
        # rows of another document than this piece's first are invisible to it
        return halo * self._halo_mask[..., None].to(halo.dtype)

    def add_incoming_state(self, y, final_state, dt, dt_bias, A, C, seq_idx, dt_limit=(0.0, float("inf"))):
        # y: (b, l, h, p) from a zero initial state   final_state: (b, h, p, n) fp32
        # dt: (b, l, h) raw   dt_bias, A: (h,)   C: (b, l, g, n)   seq_idx: (b, l)
        # → y corrected, and the true final state of this piece
        b, l, h, p = y.shape
        n = final_state.shape[-1]
        dt = F.softplus(dt.float() + dt_bias.float()).clamp(*dt_limit)
        # (b, l, h): Σ_{u≤t} A·dt_u, scanned along the last dim: torch's scan over a middle dim
        # (b, l, h) is a slow kernel (18 of CP's 66 extra ms a step at 1.3b, bench/profile_cp.py)
        log_decay = torch.cumsum((dt * A).transpose(1, 2), dim=-1).transpose(1, 2)
        first_doc = torch.ones(b, l, dtype=torch.bool, device=y.device) if seq_idx is None else \
            seq_idx == seq_idx[:, :1]                                  # (b, l)
        # (b) + (c): gather every rank's (h_s, log a_s) in one collective
        packed = torch.cat([final_state.reshape(b, -1), log_decay[:, -1]], dim=1)   # (b, h·p·n + h)
        every = all_gather_pieces(packed, self.group)                                # (cp, b, h·p·n + h)
        states = every[..., :-h].reshape(self.world, b, h, p, n)
        log_totals = every[..., -h:]                                                 # (cp, b, h)
        passes = (self._joins & self._continues).to(states.dtype)                    # (cp, b)
        # prefix: h_in = joins_r · Σ_{s<r} (Π_{s<t<r} passes_t·a_t) h_s, as weights on every
        # rank's state. Every rank uses every gathered state (rank 0 with zero weights) so
        # that each rank runs the all-gather's backward: a collective skipped by one rank
        # because its loss does not depend on it would hang the others.
        weights = []                                                                 # (cp, b, h)
        for s in range(self.world):
            weight = torch.zeros_like(log_totals[0])
            if s < self.rank:
                between = log_totals[s + 1:self.rank].sum(0)                         # Σ log a_t, s<t<r
                open_path = passes[s + 1:self.rank].prod(0) * self._joins[self.rank].to(states.dtype)
                weight = torch.exp(between) * open_path[:, None]
            weights.append(weight)
        h_in = torch.einsum("sbh,sbhpn->bhpn", torch.stack(weights), states)
        # (d): y_t += C_t · exp(Σ_{u≤t} A·dt_u) · h_in, for tokens of the piece's first document
        # per group, not per head: C is never expanded to (b, l, h, n) (1 GiB a layer at 32k tokens)
        g = C.shape[2]
        read = torch.einsum("blgn,bgkpn->blgkp", C.float(), h_in.view(b, g, h // g, p, n)).reshape(b, l, h, p)
        weight = torch.exp(log_decay) * first_doc[..., None].to(log_decay.dtype)     # (b, l, h)
        # one pass in y's dtype (bf16 under autocast, where the einsum's output is bf16 too):
        # fp32 temporaries of (b, l, h, p) cost CP a dozen extra passes a layer, forward and back
        y = torch.addcmul(y, read.to(y.dtype), weight.to(y.dtype)[..., None])
        # h_in is zero unless the border joins, so only "no document starts inside" matters here
        through_self = self._continues[self.rank].to(final_state.dtype)[:, None] * torch.exp(log_totals[self.rank])
        return y, final_state + through_self[..., None, None] * h_in
