"""Context parallelism with state passing: the Mamba-2 paper's sequence parallelism (§8),
DESIGN §4 (its correction step, y += C·decay·h_in after a zero-state SSD, is replaced by an
SSD run from h_in: below).

The sequence is cut into cp contiguous pieces, one per rank. A Mamba-2 layer needs from
the ranks before it only (a) the last d_conv-1 conv input rows of the previous rank (the
halo) and (b) the SSM state entering its piece, h_in(r+1) = the final state of piece r run
from h_in(r). Each layer sends d_conv-1 rows to one neighbour and B·H·P·N numbers of state,
independent of the sequence length. Two ways to pass the state:

- Relayed (the Triton op on CUDA, parallel.cp_symmetric_memory; `StateRelay`): rank r's state
  passing, run from h_in(r), writes its final state into a slot of its symmetric-memory buffer,
  and rank r+1's state passing reads it there once a signal says it is written. Each rank
  passes over its chunks once, and waits only on the rank before it, which has run ahead. The
  backward relays the gradient of each piece's initial state the other way (the SSD's
  backward takes it as the gradient of the previous piece's final state).
- All-gathered (the CPU tests on gloo, the reference op, or where symmetric memory cannot be
  set up): with h_s piece s's final state run from zero and a_s its total decay,
  h_in(r) = Σ_{s<r} (Π_{s<t<r} a_t) h_s, Mamba-2's state passing one level up. Every rank
  all-gathers (h_r, log a_r); the Triton op runs its state passing from zero, then adds h_in's
  part to the states entering each chunk. Its backward is the same prefix sum the other way,
  one more all-gather a layer; the reference op differentiates the forward with autograd.

The Triton op passes the states in C's dtype (bf16 in training), the dtype of each chunk's
entering state on one GPU: relayed, each border rounds the state carried on (cp-1 roundings
from the first rank to the last, where one GPU carries fp32), gathered, each gathered state is
rounded once; the log decays stay fp32.

Documents (`seq_idx`, ids of the whole sequence, sliced per rank): a state or a halo row
reaches only tokens of its own document; a document that starts exactly at a rank border
gets nothing. The kernels apply an initial state to the tokens whose seq_idx equals
seq_idx[:, 0], so the halo rows of other documents are zeroed here and the state is
zeroed where the border starts a document.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from kernels.reference.ssd import WeightedStates
from mamba_train.parallel.symmetric_exchange import StateRelay

# ----------------------------------------------------------------------------- collectives


class _AllGather(torch.autograd.Function):
    """all_gather_into_tensor along a new leading dim; backward reduce-scatters the
    gradient (every rank's loss may depend on every rank's piece)."""

    @staticmethod
    def forward(ctx, piece, group):
        # piece: (...) → gathered: (world, ...)
        ctx.group = group
        return all_gather_plain(piece, group)

    @staticmethod
    def backward(ctx, grad):
        piece_grad = grad.new_empty(grad.shape[1:])
        dist.reduce_scatter_tensor(piece_grad, grad.reshape(-1, *grad.shape[2:]).contiguous(), group=ctx.group)
        return piece_grad, None


def all_gather_pieces(piece: torch.Tensor, group) -> torch.Tensor:
    return _AllGather.apply(piece, group)


def all_gather_plain(piece: torch.Tensor, group) -> torch.Tensor:
    # (...) → (world, ...) outside autograd
    return _all_gather(piece, group, async_op=False)[0]


def all_gather_started(piece: torch.Tensor, group):
    # (...) → ((world, ...) once work.wait() has run, work): the all-gather runs beside what
    # the current stream does until then (NCCL: on its own stream; wait() makes the current
    # stream wait for it, so it must run on the stream that was current here)
    return _all_gather(piece, group, async_op=True)


def _all_gather(piece, group, async_op):
    # gloo wants the output concatenated along dim 0, not stacked: gather, then view
    world = dist.get_world_size(group)
    gathered = piece.new_empty((world * piece.shape[0], *piece.shape[1:]))
    work = dist.all_gather_into_tensor(gathered, piece.contiguous(), group=group, async_op=async_op)
    return gathered.view(world, *piece.shape), work


def _exchange(send: torch.Tensor | None, send_to: int | None, recv_like: torch.Tensor, recv_from: int | None,
              group) -> torch.Tensor:
    """Send `send` to group rank send_to and receive a tensor like recv_like from recv_from
    (None: no partner; zeros are received). Posted together so neighbours cannot deadlock."""
    # contiguous, whatever recv_like is; zeros only where no partner sends (a fill kernel)
    received = recv_like.new_zeros(recv_like.shape) if recv_from is None else recv_like.new_empty(recv_like.shape)
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
        ctx.group = group
        return _exchange(tail, rank + 1 if rank + 1 < world else None, tail, rank - 1 if rank > 0 else None, group)

    @staticmethod
    def backward(ctx, halo_grad):
        return _to_previous_rank(halo_grad, ctx.group), None


def _to_previous_rank(halo_grad: torch.Tensor, group) -> torch.Tensor:
    """_FromPreviousRank's backward: rank r sends its halo's gradient to rank r-1 and gets its
    tail's from rank r+1 (the last rank gets zeros)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return _exchange(halo_grad, rank - 1 if rank > 0 else None, halo_grad, rank + 1 if rank + 1 < world else None,
                     group)


# ----------------------------------------------------------------------------- the mixer hook


class RelayPass(NamedTuple):
    """One layer's boundary state passing through this rank (ContextParallel.relay_forward /
    relay_backward), as the Triton state passing takes it: `incoming` the neighbour's state in
    its symmetric buffer (None where none comes) and `scale` (b,) fp32 its factor, 0 where a
    document starts at the border; `outgoing` this rank's slot for what it sends on (None where
    it sends nothing); `done()` after the kernel that read and wrote them."""
    incoming: torch.Tensor | None
    scale: torch.Tensor | None
    outgoing: torch.Tensor | None
    done: Callable[[], None]


class ContextParallel:
    """The mixer's context-parallel hook (Mamba2Mixer.context_parallel), passed to
    `kernels.mixer_body`. One object is shared by every layer; `begin(seq_idx)` records, once
    per forward, where documents cross this rank's borders (one small all-gather of ids, not
    per layer).

    halo / state_in are differentiable (the reference mixer body runs them under autograd);
    halo_grad / final_state_grad_async are their backward for an op that runs its own (the
    Triton mixer body calls halo and state_in_async in its forward, these two in its
    backward). The _async forms start the all-gather and return a function that waits for it and
    gives the result: WeightedStates (the gathered states and log decays, with the coef and
    reach set in `begin`: the kernel that reads them forms the weights and the sum), so that
    work which needs neither runs meanwhile; call it on the stream that was current when the
    all-gather started. On CUDA the Triton op relays the states instead (`relays`,
    `relay_forward`, `relay_backward`)."""

    def __init__(self, group, d_conv: int, symmetric: bool = True):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.halo_len = d_conv - 1
        self._halo_mask = self._into_this = self._from_this = None
        # symmetric: on CUDA, the Triton op's states are relayed rank to rank through symmetric
        # memory (StateRelay, made at the first pass, which knows their size) rather than
        # all-gathered, unless it cannot be set up
        self._symmetric_wanted = symmetric
        self._relay: StateRelay | None = None   # the group's (StateRelay.for_group), shared
        self._relay_scales = (None, None)

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
        previous_tail = tails[self.rank - 1] if self.rank > 0 else torch.full_like(tails[0], -1)
        self._halo_mask = previous_tail == first[self.rank][:, None]             # (b, halo)
        # Which pieces' states reach which (the same for every layer, so here, once a step):
        # source s reaches target t > s when t's first token joins t-1's last document and
        # every piece between them passes a state through (joins its predecessor, and no
        # document starts inside it)
        passes = joins & (first == last)                                         # (cp, b)
        ranks = torch.arange(self.world, device=joins.device)
        target, source, middle = ranks[:, None, None], ranks[None, :, None], ranks[None, None, :]
        between = (source < middle) & (middle < target)                          # (cp t, cp s, cp u): s < u < t
        blocked = (between[..., None] & ~passes[None, None]).any(dim=2)          # (cp t, cp s, b)
        paths = (ranks[None, :] < ranks[:, None])[..., None] & joins[:, None, :] & ~blocked
        # WeightedStates' coef and reach (fp32) for the two sums every layer takes over the
        # gathered pieces: the state entering this piece (a term per source s) and the
        # gradient of this piece's final state (a term per target t): log w = Σ_u coef·log a_u
        # over the pieces u between them, and no weight where no path runs
        between, paths = between.float(), paths.float()
        # (contiguous: the kernel reads coef so, and a copy per layer would run after the wait)
        self._into_this = (between[self.rank], paths[self.rank])                 # (cp s, cp u), (cp s, b)
        self._from_this = (between[:, self.rank].contiguous(), paths[:, self.rank])   # (cp t, cp u), (cp t, b)
        # the relay's factors (b,) fp32 for the state entering this piece (1 where this piece's
        # first token continues the previous piece's last document) and for the gradient of its
        # final state (where the next piece's first token continues this piece's last document)
        self._relay_scales = (joins[self.rank].float(),
                              joins[self.rank + 1].float() if self.rank + 1 < self.world else None)

    # -- (a) the conv's halo

    def halo(self, tail: torch.Tensor) -> torch.Tensor:
        # tail: (batch, d_conv-1, conv_dim) this piece's last conv input rows → the previous
        # piece's, as this piece's conv initial state
        if self._halo_mask is None:
            raise RuntimeError("ContextParallel.begin(seq_idx) must run before the layers (ParallelMamba2LM does)")
        halo = _FromPreviousRank.apply(tail, self.group)
        # rows of another document than this piece's first are invisible to it
        return halo * self._halo_mask[..., None].to(halo.dtype)

    def halo_grad(self, dhalo: torch.Tensor) -> torch.Tensor:
        # the gradient of this piece's halo → that of its own tail (from the next piece)
        return _to_previous_rank(dhalo * self._halo_mask[..., None].to(dhalo.dtype), self.group)

    # -- (b) the state entering this piece

    def state_in(self, final_state: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
        # final_state: (b, h, p, n) fp32, this piece run from a zero state   log_decay: (b, h),
        # Σ A·dt over the piece  →  h_in (b, h, p, n): the state entering this piece
        states, log_totals = self._unpack(all_gather_pieces(self._pack(final_state, log_decay), self.group),
                                          final_state.shape)
        # Every rank weighs every gathered state (rank 0 with zero weights) so that under
        # autograd each rank runs the all-gather's backward: a collective skipped by one rank
        # because its loss does not depend on it would hang the others.
        return WeightedStates(states, log_totals, *self._into_this).sum()

    def state_in_async(self, final_state: torch.Tensor, log_decay: torch.Tensor, wire_dtype=None):
        # state_in outside autograd, its all-gather started: → a function giving h_in
        # (WeightedStates). wire_dtype: the states' dtype on the wire (default theirs, fp32);
        # the log decays travel in fp32 whatever it is
        return self._weighted_states_async(final_state, log_decay, wire_dtype, self._into_this)

    def final_state_grad_async(self, dstate_in: torch.Tensor, log_decay: torch.Tensor, wire_dtype=None):
        # dstate_in: (b, h, p, n) the gradient of h_in through this piece's y alone → a
        # function giving the gradient of this piece's true final state (h_in of the next piece,
        # and on; WeightedStates), the all-gather it needs started now
        return self._weighted_states_async(dstate_in, log_decay, wire_dtype, self._from_this)

    def _weighted_states_async(self, state, log_decay, wire_dtype, coef_reach):
        # every rank's state with its log decay, weighted by coef_reach (begin), not summed: the
        # state passing that reads them forms the weights and the sum as it loads them. The
        # all-gather started now, the rest (views) in the function returned. Outside autograd:
        # the Triton op's own passes
        with torch.no_grad():
            every, work = all_gather_started(self._pack(state, log_decay, wire_dtype), self.group)
        shape = state.shape

        @torch.no_grad()
        def finish() -> WeightedStates:
            work.wait()
            return WeightedStates(*self._unpack(every, shape), *coef_reach)
        return finish

    @staticmethod
    def _pack(state, log_decay, wire_dtype=None):
        # (b, h, p, n), (b, h) → (b, h·p·n + h·w): one tensor for one collective, the state in
        # wire_dtype (default its own) and after it the log decays' fp32 bits, w words each
        # (1 in fp32, 2 in bf16: a log decay of -30 rounded to bf16 would be off by 0.06)
        wire_dtype = wire_dtype or state.dtype
        b = log_decay.shape[0]
        if wire_dtype.itemsize >= 4:   # fp32 (float64 in the reference's checks): differentiable, no bit views
            return torch.cat([state.reshape(b, -1).to(wire_dtype), log_decay.to(wire_dtype)], dim=1)
        assert wire_dtype.itemsize == 2, f"the states travel in float64, fp32, bf16 or fp16, not {wire_dtype}"
        decay_words = log_decay.float().contiguous().view(wire_dtype)
        state_size = state.shape[1:].numel()
        packed = state.new_empty((b, state_size + decay_words.shape[1]), dtype=wire_dtype)
        packed[:, :state_size].copy_(state.reshape(b, -1))   # cast as it is written: no cast, then cat
        packed[:, state_size:].copy_(decay_words)
        return packed

    # -- (b') the same states relayed rank to rank (the Triton op on CUDA)

    def relays(self, state_shape, wire_dtype, device) -> bool:
        """Whether the Triton op relays this layer's boundary states rank to rank over symmetric
        memory (StateRelay: `relay_forward` / `relay_backward`) rather than all-gathering them
        (`state_in_async` / `final_state_grad_async`). Makes or grows the relay where needed:
        collective, as every rank passes the same shapes at the same point."""
        state_bytes = math.prod(state_shape) * wire_dtype.itemsize
        if not (self._symmetric_wanted and device.type == "cuda" and self.world > 1):
            return False
        capturing = torch.cuda.is_current_stream_capturing()
        if capturing and (self._relay is None or state_bytes > self._relay.slot_bytes):
            raise RuntimeError("context parallelism: the relay of boundary states is set up (or grown) eagerly, not "
                               "inside a CUDA graph's capture; run an eager forward and backward of the largest "
                               "batch first")
        if self._relay is not None:
            if state_bytes > self._relay.slot_bytes:   # every rank has relayed so far, and cannot stop alone
                self._relay.grow(state_bytes)
            self._relay.captured |= capturing
            return True
        relay, failure = None, None
        try:
            from torch.distributed import _symmetric_memory as symm_mem
            with warnings.catch_warnings():
                # torch 2.11 and later warn that the call is no longer needed; older ones need it
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(self.group.group_name)
            relay = StateRelay.for_group(self.group.group_name, state_bytes)
            if (relay.rank, relay.world) != (self.rank, self.world):
                raise RuntimeError(f"the workspace's rank {relay.rank} of {relay.world} is not the group's "
                                   f"{self.rank} of {self.world}")
        except RuntimeError as err:   # no symmetric memory here (no P2P between the GPUs, ...)
            failure = err
        # the first pass: every rank relays or every rank all-gathers, decided together
        everywhere = torch.tensor([failure is None], dtype=torch.int32, device=device)
        dist.all_reduce(everywhere, op=dist.ReduceOp.MIN, group=self.group)
        if not everywhere.item():
            warnings.warn(f"context parallelism: no symmetric memory on every rank ({failure or 'another rank'}); "
                          "the boundary states go through NCCL all-gathers")
            self._symmetric_wanted = False
            return False
        self._relay = relay
        return True

    def relay_forward(self, state_shape, wire_dtype) -> RelayPass:
        """The forward's pass (after `relays`): the previous piece's final state, once it is
        there, and this rank's slot for its own final state, once the next rank has read the
        last. Call `done()` after the state passing that reads and writes them."""
        return self._relay_pass(StateRelay.FORWARD, state_shape, wire_dtype, self._relay_scales[0])

    def relay_backward(self, state_shape, wire_dtype) -> RelayPass:
        """The backward's pass: the gradient of the next piece's initial state (that of this
        piece's final state, once scaled), and this rank's slot for the gradient of its own
        initial state. Call `done()` after the state passing's backward."""
        return self._relay_pass(StateRelay.BACKWARD, state_shape, wire_dtype, self._relay_scales[1])

    def _relay_pass(self, direction, state_shape, wire_dtype, scale) -> RelayPass:
        relay = self._relay
        incoming = relay.receive(direction, state_shape, wire_dtype)
        outgoing = relay.outgoing(direction, state_shape, wire_dtype)

        def done() -> None:
            relay.sent(direction)   # first: the rank waiting for it is the one behind
            relay.read(direction)
        return RelayPass(incoming, scale if incoming is not None else None, outgoing, done)

    @staticmethod
    def _unpack(every, state_shape):
        # (cp, b, h·p·n + h·w) → (cp, b, h, p, n) in the wire's dtype, (cp, b, h) fp32 (or the
        # wire's dtype, if wider)
        state_size = state_shape[1:].numel()
        states, words = every[..., :state_size], every[..., state_size:]
        if words.dtype.itemsize == 2:   # fp32 bits in 2-byte words: unaligned after an odd h·p·n, so copied
            words = (words if state_size % 2 == 0 else words.clone(memory_format=torch.contiguous_format))
            words = words.view(torch.float32)
        return states.reshape(every.shape[0], *state_shape), words
