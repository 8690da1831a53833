"""The public chunked SSD on Triton: the stages of DESIGN §3 chained into one autograd Function.

Forward runs chunk_cumsum → chunk_state and state_passing (one fused kernel where the grid is
large enough: state_passing.py) → bmm → chunk_scan and saves the inputs, the states entering
each chunk (states_in, in C's dtype: what chunk_scan read) and y before the gate when z is
given. Backward recomputes the cheap intermediates (cumsums, CB in fp32), then runs the
reverse stages (chunk_scan's d states_in and the state passing fused likewise); every stage
adds its gradient w.r.t. dA_cumsum into one fp32 buffer, which chunk_cumsum's backward turns
into gradients for dt, A and dt_bias.

Why states_in is kept, not recomputed: recomputing it runs chunk_state and state_passing again
(0.12 of 1.3 ms forward+backward at b4 L2048 h64 on an H100), and kept in bf16 it weighs
n / chunk_size of x: half of it at chunk 256, n = 128 (h·p·n·2 bytes a chunk against 256·h·p·2
for x). The backward reads the same rounded states the forward used: chunk_scan_bwd_dc casts them to
dy's dtype for its dot anyway, and state passing's backward forms <dS, S> in fp32 from them.

Gradients shared between programs are summed with tl.atomic_add(..., sem="relaxed"): they are
read only after the kernel ends, and Triton's default semantics (acq_rel) fence every atomic.

Factored decay. The causal loops (chunk_scan_fwd, chunk_scan_bwd_dx, bmm_bwd_dcb) weight each
pair t >= s of a chunk by exp(dA_cumsum[t] - dA_cumsum[s]): one exp per pair. For a tile of
sources wholly before a tile of targets, a token r between them splits that into
exp(dA[t] - dA[r]) · exp(dA[r] - dA[s]): two vectors of exps per tile. (A 64×64 tile's exps
take as many cycles of the exp unit as its dot takes of the tensor cores; measured on an H100
the loops gained only a few percent: bench/results/ssd-notes.md.) When dt >= 0 at every token, dA_cumsum is
monotone along a head's chunk (whatever A's sign), so both factors lie on the side of 1 that
their product does and neither overflows unless the product would; the kernels then factor
(`factor_decay`). A dt that may be negative (no softplus and a dt_limit reaching below 0, or
a dt_limit wholly below 0) keeps the exact exp everywhere.
"""

import math

import torch

from ..reference.ssd import _check_chunk_size, _check_ssd_inputs
from .bmm import bmm_bwd_dcb, bmm_fwd
from .chunk_cumsum import chunk_cumsum_bwd, chunk_cumsum_fwd
from .chunk_scan import chunk_scan_bwd_dc, chunk_scan_bwd_dx, chunk_scan_fwd, gate_bwd
from .chunk_state import chunk_state_bwd_db
from .state_passing import add_final_state_grad, add_initial_state, dstates_bwd, states_in_fwd


def _contiguous(t):
    return None if t is None else t.contiguous()


def _log_decay(dA_cumsum):
    # (b, h, c, q) -> (b, h): Σ A·dt over the sequence (padded tokens have dt = 0)
    return dA_cumsum[..., -1].sum(dim=-1)


def dt_nonnegative(dt_softplus, dt_limit):
    """Whether dt >= 0 at every token, so the causal loops may factor the decay (above)."""
    # dt after softplus and clamp(dt_limit): softplus is >= 0, and the clamp keeps it so
    # unless dt_limit reaches below 0; without softplus, dt_limit's lower bound decides
    return dt_limit[1] >= 0 and (dt_softplus or dt_limit[0] >= 0)


def ssd_fwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit,
            context_parallel=None):
    """The forward stages on contiguous inputs -> y (x's dtype), y before the gate (or None),
    final states (b, h, p, n) fp32 (None where context parallelism relays them: they went into
    the relay's slot, which the next pass reuses), and states_in (b, c, h, p, n) in C's dtype
    for backward.

    context_parallel (the mixer body's hook, kernels.reference.mixer_body): the initial states
    are the state entering this piece. Relayed (CUDA): the previous piece's final state, read in
    place once that rank has written it, and this piece's written for the next, by one state
    passing as on one GPU. Else the pass from zero runs first (states_in_fwd, fused where the
    grid fills), the pieces' final states are all-gathered, and the incoming state's part is
    added onto it (add_initial_state). The states travel in C's dtype, the one every chunk's
    entering state has on one GPU (states_in)."""
    dt_out, dA_cumsum = chunk_cumsum_fwd(dt, A, chunk_size, dt_bias, dt_softplus, dt_limit)
    # states_in in C's dtype: chunk_scan_fwd casts them to that for its dot anyway, so y is
    # the same and half the bytes move (and are kept)
    state_shape = (x.shape[0], x.shape[2], x.shape[3], B.shape[-1])
    if context_parallel is None:
        states_in, final_states = states_in_fwd(B, x, dt_out, dA_cumsum, initial_states, seq_idx, C.dtype)
        cb = _scores(C, B, chunk_size)
    elif context_parallel.relays(state_shape, C.dtype, x.device):
        assert initial_states is None, "context parallelism supplies the initial states"
        cb = _scores(C, B, chunk_size)   # needs no state: runs before the wait for the previous rank's
        relay = context_parallel.relay_forward(state_shape, C.dtype)
        states_in, _ = states_in_fwd(B, x, dt_out, dA_cumsum, relay.incoming, seq_idx, C.dtype,
                                     init_scale=relay.scale, final_out=relay.outgoing)
        relay.done()
        final_states = None
    else:
        assert initial_states is None, "context parallelism supplies the initial states"
        zero_start = states_in_fwd(B, x, dt_out, dA_cumsum, None, seq_idx, torch.float32)
        wait_state_in = context_parallel.state_in_async(zero_start[1], _log_decay(dA_cumsum), C.dtype)
        cb = _scores(C, B, chunk_size)   # needs no state: runs while the pieces' states are gathered
        states_in, final_states = add_initial_state(zero_start, wait_state_in(), dA_cumsum, x.shape[1], seq_idx,
                                                    C.dtype)
        del zero_start
    y, y_pregate = chunk_scan_fwd(cb, x, dt_out, dA_cumsum, C, states_in, D, z, seq_idx,
                                  dt_nonnegative(dt_softplus, dt_limit))
    return y, y_pregate, final_states, states_in


def _scores(C, B, chunk_size):
    # CB in C's dtype: chunk_scan_fwd rounds each score (CB · decay · dt) to it for its dot
    # anyway, so this adds one rounding of CB before that, and halves the bytes it reads (0.162
    # → 0.153 ms at b8 L2048 h32 on an H100). Backward recomputes CB in fp32.
    return bmm_fwd(C, B, chunk_size, C.dtype)


def ssd_bwd(dout, dfinal_states, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
            y_pregate, states_in, dt_softplus, dt_limit, need_dinit, context_parallel=None, dB_out=None, dC_out=None):
    """The reverse stages, from the forward's states_in and recomputed cumsums and CB -> the
    gradients of (x, dt, A, B, C, D, z, dt_bias, initial_states), each in its input's dtype
    (None where the input is None, and dinit None unless `need_dinit`). dout or dfinal_states
    may be None. dB and dC are written into dB_out and dC_out where given (any strides: the
    mixer body passes the two halves of one tensor, its conv's gradient). With
    context_parallel (as in ssd_fwd) the final states' gradient comes from the pieces after
    this one: relayed, the next rank's initial state's gradient, read in place; else
    all-gathered, given the gradient of this piece's initial states through y."""
    factor_decay = dt_nonnegative(dt_softplus, dt_limit)
    dt_out, dA_cumsum = chunk_cumsum_fwd(dt, A, chunk_size, dt_bias, dt_softplus, dt_limit)
    cb = bmm_fwd(C, B, chunk_size)
    dout = torch.zeros_like(x) if dout is None else dout.to(x.dtype).contiguous()
    if z is not None:
        dy, dz = gate_bwd(dout, z, y_pregate)
    else:
        dy, dz = dout, None
    # the stages' gradients w.r.t. dA_cumsum and dt_out, accumulated in place: one zeroed buffer
    ddA_cumsum, ddt_out = torch.zeros((2, *dA_cumsum.shape), device=dA_cumsum.device, dtype=torch.float32).unbind(0)
    need_dinit = initial_states is not None and need_dinit
    state_shape = (x.shape[0], x.shape[2], x.shape[3], B.shape[-1])
    relayed = context_parallel is not None and context_parallel.relays(state_shape, C.dtype, x.device)
    if context_parallel is None:
        dstates, dinit = dstates_bwd(dy, C, states_in, dA_cumsum, ddA_cumsum, dfinal_states, seq_idx, need_dinit)
    else:
        assert dfinal_states is None and not need_dinit, "context parallelism supplies the boundary states"
        if not relayed:
            # the pass without the final state's gradient (as on one GPU) gives the initial
            # state's gradient through y, which the later pieces' final-state gradient needs;
            # the final state's part is added after (add_final_state_grad)
            through_y, dinit_through_y = dstates_bwd(dy, C, states_in, dA_cumsum, ddA_cumsum, None, seq_idx,
                                                     need_dinit=True, dstates_dtype=torch.float32)
            wait_dfinal = context_parallel.final_state_grad_async(dinit_through_y, _log_decay(dA_cumsum), C.dtype)
    # CB's gradient and C's need no dstates: with context parallelism they run while the
    # gradients are gathered, or before the wait for the next rank's
    dcb = bmm_bwd_dcb(dy, x, cb, dt_out, dA_cumsum, ddA_cumsum, seq_idx, factor_decay)
    dC = chunk_scan_bwd_dc(dcb, B, C, dy, states_in, dA_cumsum, ddA_cumsum, seq_idx, out=dC_out)
    if relayed:
        relay = context_parallel.relay_backward(state_shape, C.dtype)
        dstates, _ = dstates_bwd(dy, C, states_in, dA_cumsum, ddA_cumsum, relay.incoming, seq_idx,
                                 need_dinit=relay.outgoing is not None, dfinal_scale=relay.scale,
                                 dinit_out=relay.outgoing)
        relay.done()
        dinit = None   # it went to the previous rank
    elif context_parallel is not None:
        dstates, dinit = add_final_state_grad(through_y, states_in, dA_cumsum, ddA_cumsum, x.shape[1],
                                              wait_dfinal(), seq_idx), None
        del through_y
    dx, dD = chunk_scan_bwd_dx(cb, dy, x, B, dstates, dt_out, dA_cumsum, ddt_out, D, seq_idx, factor_decay)
    dB = chunk_state_bwd_db(x, B, C, dcb, dstates, dt_out, dA_cumsum, ddA_cumsum, seq_idx, out=dB_out)
    ddt, dA, ddt_bias = chunk_cumsum_bwd(ddA_cumsum, ddt_out, dt, A, dt_bias, dt_softplus, dt_limit)
    if dD is not None:
        dD = (dD if D.dim() == 2 else dD.sum(dim=1)).to(D.dtype)
    if ddt_bias is not None:
        ddt_bias = ddt_bias.to(dt_bias.dtype)
    if dinit is not None:
        dinit = dinit.to(initial_states.dtype)
    return dx, ddt, dA.to(A.dtype), dB, dC, dD, dz, ddt_bias, dinit


class SSDFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus,
                dt_limit, return_final_states):
        # the kernels read A, D, dt_bias with unit stride along heads (and D along channels)
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx = (
            _contiguous(t) for t in (x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx))
        y, y_pregate, final_states, states_in = ssd_fwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states,
                                                        seq_idx, dt_softplus, dt_limit)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, y_pregate, states_in)
        ctx.chunk_size, ctx.dt_softplus, ctx.dt_limit = chunk_size, dt_softplus, dt_limit
        # an unused output's gradient arrives as None, not as a tensor of zeros
        ctx.set_materialize_grads(False)
        return y, final_states

    @staticmethod
    def backward(ctx, dout, dfinal_states):
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, y_pregate, states_in = ctx.saved_tensors
        grads = ssd_bwd(dout, dfinal_states, x, dt, A, B, C, ctx.chunk_size, D, z, dt_bias, initial_states, seq_idx,
                        y_pregate, states_in, ctx.dt_softplus, ctx.dt_limit, need_dinit=ctx.needs_input_grad[8])
        return (*grads, None, None, None, None, None)


def ssd_triton(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=True,
               dt_limit=(0.0, math.inf), initial_states=None, seq_idx=None, return_final_states=False):
    """Mamba-2 SSD (chunked, Triton); same signature and result as `kernels.reference.ssd_chunked`.

    Returns y (b, l, h, p) in x's dtype, and with `return_final_states` also the state after
    the last token (b, h, p, n) in float32.
    """
    # x, z: (b, l, h, p)  dt: (b, l, h)  A, dt_bias: (h,)  B, C: (b, l, g, n)  D: (h,) | (h, p)
    # initial_states: (b, h, p, n)  seq_idx: (b, l)
    _check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    _check_chunk_size(chunk_size)
    if B.dtype != C.dtype:
        raise ValueError(f"B and C: expected one dtype, found B {B.dtype} and C {C.dtype}")
    y, final_states = SSDFunction.apply(
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus,
        tuple(float(v) for v in dt_limit), return_final_states)
    return (y, final_states) if return_final_states else y
