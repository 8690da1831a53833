"""Stage 3 of SSD (DESIGN §3): the sequential scan over chunks (the paper's "middle factor", §6).

    S_{-1} = initial_states,   S_c = a_c · S_{c-1} + states_c,   a_c = exp(dA_cumsum_c[last])

states_in[c] = S_{c-1} is the state entering chunk c, and S_{last} the final state. Where
the document of chunk c's last token differs from that of chunk c-1's last token (for
c = 0: from seq_idx[:, 0]), a document started inside chunk c and a_c is 0.

Backward, with G_c the gradient of S_c (G_last = d final):
    dstates_c = G_c,   d a_c = <G_c, S_{c-1}>,   G_{c-1} = dstates_in[c] + a_c · G_c,
    d initial_states = G_{-1}.

The forward also comes fused with stage 2 (`chunk_state_passing_fwd`): one program per
(p block × n block, batch, head) walks the chunks in order, computing each chunk's own state
tile (chunk_state.own_state) as it goes, so the fp32 chunk states are never written and read
back (at b8 L2048 h32 that is 67 MB each way) and the forward makes one launch fewer. Its
grid has no chunk axis, so it suits batches of many (batch, head) pairs, and `states_in_fwd`
picks it or the two stages by their number. Context parallelism relays its pieces' states
rank to rank on CUDA: the pass runs once from the incoming state, read in place from the
previous rank's buffer and scaled as loaded (`init_scale`: 0 where a document starts at the
border), and writes its final state into this rank's slot (`final_out`); backward likewise
(`dfinal_scale`, `dinit_out`). Where the states are all-gathered instead, the pass runs from
zero before the incoming state is known, and the incoming state's part is added after
(`add_initial_state`: the pass is linear in it; backward `add_final_state_grad`).

The backward likewise fuses chunk_scan's d states_in (chunk_scan.own_dstates_in) into the
reverse walk (`chunk_scan_state_passing_bwd`, picked by `dstates_bwd`): the fp32 d states_in
are never written and read back.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..cached_launch import cached_launch
from ..reference.ssd import WeightedStates
from ..host_math import cdiv, next_power_of_2
from . import launch
from .chunk_scan import chunk_scan_bwd_dstates, own_dstates_in
from .chunk_state import chunk_state_fwd, own_state
from .tiles import head_program_ids, state_tile


@triton.jit
def _chunk_decay(dA_cumsum_ptr, seq_idx_ptr, c, seqlen, chunk_size, stride_dA_c, stride_dA_q,
                 stride_seq_l, seq_prev, HAS_SEQ: tl.constexpr):
    # a_c and the document of chunk c's last token
    last = tl.minimum(chunk_size, seqlen - c * chunk_size) - 1
    a = tl.exp(tl.load(dA_cumsum_ptr + c * stride_dA_c + last * stride_dA_q))
    seq_new = seq_prev
    if HAS_SEQ:
        seq_new = tl.load(seq_idx_ptr + (c * chunk_size + last) * stride_seq_l)
        a = tl.where(seq_new == seq_prev, a, 0.0)
    return a, seq_new


@triton.jit
def _term_weight(log_ptr, stride_log_u, coef_ptr, reach_ptr, stride_reach_k, k, TERMS: tl.constexpr):
    # WeightedStates' w_k for one (batch, head): exp(Σ_u coef[k, u] · log_totals[u]), or 0
    # where reach[k] is 0 (the exp not taken there: it may overflow)
    log_weight = 0.0
    for u in tl.static_range(TERMS):
        log_weight += tl.load(coef_ptr + k * TERMS + u) * tl.load(log_ptr + u * stride_log_u)
    reaches = tl.load(reach_ptr + k * stride_reach_k) != 0
    return tl.where(reaches, tl.exp(tl.where(reaches, log_weight, 0.0)), 0.0)


@triton.jit
def _load_state(state_ptr, stride_k, log_ptr, stride_log_u, coef_ptr, reach_ptr, stride_reach_k, ok,
                TERMS: tl.constexpr):
    # one head's block of a state, fp32: TERMS 0, a plain state; else the weighted sum
    # Σ_k w_k · state_k of TERMS states (WeightedStates: context parallelism's gathered ones),
    # the weights formed and the sum taken here rather than by small kernels before
    if TERMS == 0:
        total = tl.load(state_ptr, mask=ok, other=0.0).to(tl.float32)
    else:
        total = _term_weight(log_ptr, stride_log_u, coef_ptr, reach_ptr, stride_reach_k, 0, TERMS) * \
            tl.load(state_ptr, mask=ok, other=0.0).to(tl.float32)
        for k in tl.static_range(1, TERMS):
            total += _term_weight(log_ptr, stride_log_u, coef_ptr, reach_ptr, stride_reach_k, k, TERMS) * \
                tl.load(state_ptr + k * stride_k, mask=ok, other=0.0).to(tl.float32)
    return total


@cached_launch
@triton.jit
def _state_passing_fwd_kernel(
    states_ptr, dA_cumsum_ptr, init_ptr, init_log_ptr, init_coef_ptr, init_reach_ptr, init_scale_ptr, seq_idx_ptr,
    base_final_ptr, states_in_ptr, final_ptr,
    dim, nchunks, seqlen, chunk_size,
    stride_st_b, stride_st_c, stride_st_h,
    stride_dA_b, stride_dA_h, stride_dA_c, stride_dA_q,
    stride_init_k, stride_init_b, stride_init_h,
    stride_log_u, stride_log_b, stride_log_h, stride_reach_k, stride_reach_b,
    stride_final_b, stride_final_h,
    stride_seq_b, stride_seq_l,
    HAS_INIT: tl.constexpr, INIT_TERMS: tl.constexpr, INIT_SCALED: tl.constexpr, HAS_SEQ: tl.constexpr,
    ONTO_BASE: tl.constexpr, BLOCK: tl.constexpr,
):
    # states: (b, c, h, p·n) fp32 (p·n contiguous); states_in likewise, in fp32 or in the dtype
    # chunk_scan_fwd casts it to anyway (backward reads the same)  final: (b, h, p·n)
    # init: (b, h, p·n), or with INIT_TERMS the weighted sum of that many (k, b, h, p·n) (_load_state);
    # with INIT_SCALED times init_scale (b,) fp32. final in its own dtype (fp32, or a relay's slot).
    # ONTO_BASE (add_initial_state): states holds the states_in of a base pass (from zero)
    # instead of the chunk states, base_final its final state; the initial state's own pass
    # (its decay alone) is added onto them
    pid_d, pid_b, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = pid_d * BLOCK + tl.arange(0, BLOCK)
    ok = offs < dim
    states_ptr += pid_b * stride_st_b + pid_h * stride_st_h + offs
    states_in_ptr += pid_b * stride_st_b + pid_h * stride_st_h + offs
    dA_cumsum_ptr += pid_b * stride_dA_b + pid_h * stride_dA_h
    if HAS_SEQ:
        seq_idx_ptr += pid_b * stride_seq_b
    if HAS_INIT:
        carried = _load_state(init_ptr + pid_b * stride_init_b + pid_h * stride_init_h + offs, stride_init_k,
                              init_log_ptr + pid_b * stride_log_b + pid_h * stride_log_h, stride_log_u,
                              init_coef_ptr, init_reach_ptr + pid_b * stride_reach_b, stride_reach_k, ok, INIT_TERMS)
        if INIT_SCALED:
            carried *= tl.load(init_scale_ptr + pid_b)
    else:
        carried = tl.zeros((BLOCK,), dtype=tl.float32)
    seq_prev = 0
    if HAS_SEQ:
        seq_prev = tl.load(seq_idx_ptr)
    for c in range(nchunks):
        entering = carried
        if ONTO_BASE:
            entering += tl.load(states_ptr + c * stride_st_c, mask=ok, other=0.0)
        tl.store(states_in_ptr + c * stride_st_c, entering.to(states_in_ptr.dtype.element_ty), mask=ok)
        a, seq_prev = _chunk_decay(dA_cumsum_ptr, seq_idx_ptr, c, seqlen, chunk_size, stride_dA_c,
                                   stride_dA_q, stride_seq_l, seq_prev, HAS_SEQ)
        carried = a * carried
        if not ONTO_BASE:
            carried += tl.load(states_ptr + c * stride_st_c, mask=ok, other=0.0)
    final_offs = pid_b * stride_final_b + pid_h * stride_final_h + offs
    if ONTO_BASE:
        carried += tl.load(base_final_ptr + final_offs, mask=ok, other=0.0)
    tl.store(final_ptr + final_offs, carried.to(final_ptr.dtype.element_ty), mask=ok)


@cached_launch
@triton.jit
def _chunk_state_passing_fwd_kernel(
    x_ptr, B_ptr, dt_ptr, dA_cumsum_ptr, init_ptr, init_scale_ptr, seq_idx_ptr, states_in_ptr, final_ptr,
    seqlen, nchunks, chunk_size, hdim, dstate, heads_per_group,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_q,
    stride_seq_b, stride_seq_l,
    stride_st_b, stride_st_c, stride_st_h, stride_st_p, stride_st_n,
    stride_init_b, stride_init_h, stride_init_p, stride_init_n,
    HAS_INIT: tl.constexpr, INIT_SCALED: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HEADS_FASTEST: tl.constexpr,
):
    # one program per (p block × n block, batch, head), over every chunk in order: states_in
    # (b, c, h, p, n) in its dtype, final (b, h, p, n) in its own (fp32, or a relay's slot);
    # init and final share strides; with INIT_SCALED init is taken times init_scale (b,) fp32
    pid_pn, pid_b, pid_h = head_program_ids(HEADS_FASTEST)
    offs_p, offs_n, tile_ok = state_tile(pid_pn, hdim, dstate, BLOCK_P, BLOCK_N)
    x_ptr += pid_b * stride_x_b + pid_h * stride_x_h
    B_ptr += pid_b * stride_B_b + (pid_h // heads_per_group) * stride_B_g
    dt_ptr += pid_b * stride_dt_b + pid_h * stride_dt_h
    dA_cumsum_ptr += pid_b * stride_dt_b + pid_h * stride_dt_h
    states_in_ptr += (pid_b * stride_st_b + pid_h * stride_st_h
                      + offs_p[:, None] * stride_st_p + offs_n[None, :] * stride_st_n)
    init_offs = (pid_b * stride_init_b + pid_h * stride_init_h
                 + offs_p[:, None] * stride_init_p + offs_n[None, :] * stride_init_n)
    if HAS_INIT:
        carried = tl.load(init_ptr + init_offs, mask=tile_ok, other=0.0).to(tl.float32)
        if INIT_SCALED:
            carried *= tl.load(init_scale_ptr + pid_b)
    else:
        carried = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    seq_prev = 0
    if HAS_SEQ:
        seq_idx_ptr += pid_b * stride_seq_b
        seq_prev = tl.load(seq_idx_ptr)
    for c in range(nchunks):
        tl.store(states_in_ptr + c * stride_st_c, carried.to(states_in_ptr.dtype.element_ty), mask=tile_ok)
        chunk_start = c * chunk_size
        seq_chunk = seq_idx_ptr   # None without HAS_SEQ
        if HAS_SEQ:
            seq_chunk = seq_idx_ptr + chunk_start * stride_seq_l
        own = own_state(x_ptr + chunk_start * stride_x_l, B_ptr + chunk_start * stride_B_l, dt_ptr + c * stride_dt_c,
                        dA_cumsum_ptr + c * stride_dt_c, seq_chunk, offs_p, offs_n,
                        tl.minimum(chunk_size, seqlen - chunk_start), chunk_size, hdim, dstate,
                        stride_x_l, stride_x_p, stride_B_l, stride_B_n, stride_dt_q, stride_seq_l,
                        HAS_SEQ, BLOCK_P, BLOCK_N, BLOCK_K)
        a, seq_prev = _chunk_decay(dA_cumsum_ptr, seq_idx_ptr, c, seqlen, chunk_size, stride_dt_c,
                                   stride_dt_q, stride_seq_l, seq_prev, HAS_SEQ)
        carried = a * carried + own
    tl.store(final_ptr + init_offs, carried.to(final_ptr.dtype.element_ty), mask=tile_ok)


@cached_launch
@triton.jit
def _state_passing_bwd_kernel(
    dstates_in_ptr, states_in_ptr, dA_cumsum_ptr, dfinal_ptr, dfinal_log_ptr, dfinal_coef_ptr, dfinal_reach_ptr,
    dfinal_scale_ptr, seq_idx_ptr,
    dstates_ptr, dinit_ptr, ddA_cumsum_ptr,
    dim, nchunks, seqlen, chunk_size,
    stride_st_b, stride_st_c, stride_st_h,
    stride_dA_b, stride_dA_h, stride_dA_c, stride_dA_q,
    stride_dfinal_k, stride_dfinal_b, stride_dfinal_h,
    stride_log_u, stride_log_b, stride_log_h, stride_reach_k, stride_reach_b,
    stride_init_b, stride_init_h,
    stride_seq_b, stride_seq_l,
    HAS_DFINAL: tl.constexpr, DFINAL_TERMS: tl.constexpr, DFINAL_SCALED: tl.constexpr, HAS_DINIT: tl.constexpr,
    HAS_SEQ: tl.constexpr, ONTO_BASE: tl.constexpr, BLOCK: tl.constexpr,
):
    # dstates_in: (b, c, h, p·n) fp32; states_in and dstates likewise in fp32 or the forward's
    # narrower dtype (the recurrence itself runs in fp32); ddA_cumsum (b, h, c, q) gets d a_c · a_c
    # at each chunk's last token (atomically: the p·n blocks of one head share it).
    # ONTO_BASE (add_final_state_grad): dstates_in holds the dstates of a base pass (without
    # dfinal; fp32) instead of the gradients through y; dfinal's own pass is added onto them.
    # dfinal: (b, h, p·n), or with DFINAL_TERMS the weighted sum of (k, b, h, p·n) (_load_state);
    # with DFINAL_SCALED times dfinal_scale (b,) fp32. dinit in its own dtype (fp32, or a relay's slot)
    pid_d, pid_b, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = pid_d * BLOCK + tl.arange(0, BLOCK)
    ok = offs < dim
    head_offs = pid_b * stride_st_b + pid_h * stride_st_h + offs
    dA_cumsum_ptr += pid_b * stride_dA_b + pid_h * stride_dA_h
    ddA_cumsum_ptr += pid_b * stride_dA_b + pid_h * stride_dA_h
    if HAS_SEQ:
        seq_idx_ptr += pid_b * stride_seq_b
    if HAS_DFINAL:
        grad = _load_state(dfinal_ptr + pid_b * stride_dfinal_b + pid_h * stride_dfinal_h + offs, stride_dfinal_k,
                           dfinal_log_ptr + pid_b * stride_log_b + pid_h * stride_log_h, stride_log_u,
                           dfinal_coef_ptr, dfinal_reach_ptr + pid_b * stride_reach_b, stride_reach_k, ok,
                           DFINAL_TERMS)
        if DFINAL_SCALED:
            grad *= tl.load(dfinal_scale_ptr + pid_b)
    else:
        grad = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i
        if ONTO_BASE:
            tl.store(dstates_ptr + head_offs + c * stride_st_c,
                     grad + tl.load(dstates_in_ptr + head_offs + c * stride_st_c, mask=ok, other=0.0), mask=ok)
        else:
            tl.store(dstates_ptr + head_offs + c * stride_st_c, grad, mask=ok)
        seq_prev = 0
        if HAS_SEQ:
            # document of the token before chunk c (for c = 0, the first document)
            seq_prev = tl.load(seq_idx_ptr + tl.maximum(c * chunk_size - 1, 0) * stride_seq_l)
        a, _ = _chunk_decay(dA_cumsum_ptr, seq_idx_ptr, c, seqlen, chunk_size, stride_dA_c,
                            stride_dA_q, stride_seq_l, seq_prev, HAS_SEQ)
        carried_in = tl.load(states_in_ptr + head_offs + c * stride_st_c, mask=ok, other=0.0)
        da = tl.sum(grad * carried_in, axis=0)
        last = tl.minimum(chunk_size, seqlen - c * chunk_size) - 1
        tl.atomic_add(ddA_cumsum_ptr + c * stride_dA_c + last * stride_dA_q, da * a, sem="relaxed")
        grad = a * grad
        if not ONTO_BASE:
            grad += tl.load(dstates_in_ptr + head_offs + c * stride_st_c, mask=ok, other=0.0)
    if HAS_DINIT:
        tl.store(dinit_ptr + pid_b * stride_init_b + pid_h * stride_init_h + offs, grad.to(dinit_ptr.dtype.element_ty),
                 mask=ok)


@cached_launch
@triton.jit
def _chunk_scan_state_passing_bwd_kernel(
    dy_ptr, C_ptr, states_in_ptr, dA_cumsum_ptr, dfinal_ptr, dfinal_scale_ptr, seq_idx_ptr, dstates_ptr, dinit_ptr,
    ddA_cumsum_ptr, seqlen, nchunks, chunk_size, hdim, dstate, heads_per_group,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_q,
    stride_seq_b, stride_seq_l,
    stride_st_b, stride_st_c, stride_st_h, stride_st_p, stride_st_n,
    stride_init_b, stride_init_h, stride_init_p, stride_init_n,
    HAS_DFINAL: tl.constexpr, DFINAL_SCALED: tl.constexpr, HAS_DINIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HEADS_FASTEST: tl.constexpr,
):
    # one program per (p block × n block, batch, head), over every chunk from the last:
    # chunk_scan_bwd_dstates' tile of each chunk made on the fly, then state_passing_bwd's step.
    # states_in and dstates share strides (b, c, h, p, n); dfinal, dinit share theirs (b, h, p, n).
    # With DFINAL_SCALED dfinal is taken times dfinal_scale (b,) fp32; dinit in its own dtype
    pid_pn, pid_b, pid_h = head_program_ids(HEADS_FASTEST)
    offs_p, offs_n, tile_ok = state_tile(pid_pn, hdim, dstate, BLOCK_P, BLOCK_N)
    dy_ptr += pid_b * stride_x_b + pid_h * stride_x_h
    C_ptr += pid_b * stride_C_b + (pid_h // heads_per_group) * stride_C_g
    dA_cumsum_ptr += pid_b * stride_dt_b + pid_h * stride_dt_h
    ddA_cumsum_ptr += pid_b * stride_dt_b + pid_h * stride_dt_h
    st_offs = pid_b * stride_st_b + pid_h * stride_st_h + offs_p[:, None] * stride_st_p + offs_n[None, :] * stride_st_n
    init_offs = (pid_b * stride_init_b + pid_h * stride_init_h
                 + offs_p[:, None] * stride_init_p + offs_n[None, :] * stride_init_n)
    if HAS_DFINAL:
        grad = tl.load(dfinal_ptr + init_offs, mask=tile_ok, other=0.0).to(tl.float32)
        if DFINAL_SCALED:
            grad *= tl.load(dfinal_scale_ptr + pid_b)
    else:
        grad = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    if HAS_SEQ:
        seq_idx_ptr += pid_b * stride_seq_b
    for i in range(nchunks):
        c = nchunks - 1 - i
        chunk_start = c * chunk_size
        tl.store(dstates_ptr + st_offs + c * stride_st_c, grad.to(dstates_ptr.dtype.element_ty), mask=tile_ok)
        seq_prev = 0
        seq_chunk = seq_idx_ptr   # None without HAS_SEQ
        if HAS_SEQ:
            # document of the token before chunk c (for c = 0, the first document)
            seq_prev = tl.load(seq_idx_ptr + tl.maximum(chunk_start - 1, 0) * stride_seq_l)
            seq_chunk = seq_idx_ptr + chunk_start * stride_seq_l
        a, _ = _chunk_decay(dA_cumsum_ptr, seq_idx_ptr, c, seqlen, chunk_size, stride_dt_c,
                            stride_dt_q, stride_seq_l, seq_prev, HAS_SEQ)
        carried_in = tl.load(states_in_ptr + st_offs + c * stride_st_c, mask=tile_ok, other=0.0)
        da = tl.sum(tl.sum(grad * carried_in, axis=1), axis=0)
        chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
        tl.atomic_add(ddA_cumsum_ptr + c * stride_dt_c + (chunk_len - 1) * stride_dt_q, da * a, sem="relaxed")
        own = own_dstates_in(dy_ptr + chunk_start * stride_x_l, C_ptr + chunk_start * stride_C_l,
                             dA_cumsum_ptr + c * stride_dt_c, seq_chunk, seq_prev, offs_p, offs_n, chunk_len,
                             chunk_size, hdim, dstate, stride_x_l, stride_x_p, stride_C_l, stride_C_n, stride_dt_q,
                             stride_seq_l, HAS_SEQ, BLOCK_P, BLOCK_N, BLOCK_K)
        grad = own + a * grad
    if HAS_DINIT:
        tl.store(dinit_ptr + init_offs, grad.to(dinit_ptr.dtype.element_ty), mask=tile_ok)


_BLOCK = 1024   # the two-stage kernels' elements of p·n a program

# The fused kernels' programs each walk a (batch, head)'s chunks in turn: with few (batch,
# head) pairs an SM has too few loads in flight, whatever the tiles. On an H100 (132 SMs;
# stage alone, ms, fused against the two stages): 256 pairs (b8 L2048 h32) forward 0.092
# against 0.074 + 0.044, backward 0.102 against 0.065 + 0.057, at 64-wide tiles, and 0.073 and
# 0.082 at the settings in launch.SETTINGS; 64 pairs (b1 L16384 h64) forward 0.281 against
# 0.137 + 0.085 (0.229 at the best settings a sweep found there), backward 0.312 against
# 0.115 + 0.128. With dstate split into narrower tiles below 256 programs (launch.SETTINGS'
# grid_programs; nineteenth session, same card): 128 pairs (b4 L2048 h32, a TP=2 rank of 1.3b)
# forward 0.049 against 0.042 + 0.026, backward 0.056 against 0.037 + 0.033; 64 pairs
# (b2 L8192 h32) 0.120 against 0.074 + 0.047, backward 0.153 against 0.065 + 0.070. So the
# threshold lies between 64 and 128 pairs.
FUSED_MIN_PAIRS_PER_SM = 0.75


def _fused_kernels_fill(b, h, device):
    # whether a fused state passing has enough (batch, head) pairs (FUSED_MIN_PAIRS_PER_SM). Off
    # CUDA sm_count is 0, so the interpreter always runs the fused kernels: tests that want the
    # two stages call them directly or replace this function.
    return b * h >= FUSED_MIN_PAIRS_PER_SM * launch.sm_count(device)


class _StateArg(NamedTuple):
    # a state argument as _state_passing_*_kernel take it (_load_state): the pointers
    # (states, log_totals, coef, reach), the number of terms (0: one plain state), and the
    # strides, in elements, (k, b, h) of states (each head's p·n contiguous), (u, b, h) of
    # log_totals and (k, b) of reach (coef is contiguous)
    pointers: tuple
    terms: int
    strides: tuple


def _state_arg(state, shape) -> _StateArg:
    # state: None, a (b, h, p, n) tensor, or WeightedStates of (k, b, h, p, n)
    if isinstance(state, WeightedStates):
        states, log_totals, coef, reach = state
        k = states.shape[0]
        assert tuple(states.shape[1:]) == tuple(shape), (tuple(states.shape), tuple(shape))
        assert log_totals.shape == (k, *shape[:2]) and coef.shape == (k, k) and reach.shape == (k, shape[0]), \
            "WeightedStates: log_totals (k, b, h), coef (k, k), reach (k, b) for k states"
        assert log_totals.dtype == coef.dtype == reach.dtype == torch.float32, \
            f"WeightedStates: fp32 log_totals, coef and reach, found {log_totals.dtype}, {coef.dtype}, {reach.dtype}"
        if states.stride(-1) != 1 or states.stride(-2) != shape[3]:
            states = states.contiguous()
        return _StateArg((states, log_totals, coef.contiguous(), reach), k,
                         (*states.stride()[:3], *log_totals.stride(), *reach.stride()))
    if state is None:
        return _StateArg((None,) * 4, 0, (0,) * 8)
    assert tuple(state.shape) == tuple(shape), f"expected a state of shape {tuple(shape)}, found {tuple(state.shape)}"
    state = state.contiguous()
    # no weights, none read: but the kernel forms their addresses before _load_state looks at
    # TERMS, and None + int does not compile, so state stands in for those pointers
    return _StateArg((state,) * 4, 0, (0, *state.stride()[:2], 0, 0, 0, 0, 0))


def _boundary_scale(scale, b):
    # a state's per-row factor as the kernels take it (b,) fp32 (context parallelism's relay:
    # 0 where a document starts at the piece's border), or None
    if scale is not None:
        assert scale.shape == (b,) and scale.dtype == torch.float32 and scale.is_contiguous(), \
            f"a boundary state's scale: contiguous fp32 ({b},), found {scale.dtype} {tuple(scale.shape)}"
    return scale


def _boundary_out(out, shape, device):
    # where a kernel writes a final state or dinit: out (contiguous, any float dtype: a relay's
    # slot) or a new fp32 tensor
    if out is None:
        return torch.empty(shape, device=device, dtype=torch.float32)
    assert tuple(out.shape) == tuple(shape) and out.is_contiguous(), \
        f"a boundary state's output: contiguous {tuple(shape)}, found {tuple(out.shape)}"
    return out


def state_passing_fwd(states, dA_cumsum, seqlen, initial_states=None, seq_idx=None, states_in_dtype=torch.float32,
                      base_final=None, init_scale=None, final_out=None):
    # states: (b, c, h, p, n) fp32  dA_cumsum: (b, h, c, q)  initial_states: (b, h, p, n) or
    # WeightedStates (their sum, taken as the kernel loads them), times init_scale (b,) if given
    # ->  states_in: (b, c, h, p, n) in states_in_dtype, final_states: (b, h, p, n) fp32 (or written
    # into final_out, in its dtype). base_final: see add_initial_state (states are then the base
    # pass's states_in)
    _, opts = launch.settings("state_passing_fwd")
    b, nchunks, h, p, n = states.shape
    chunk_size = dA_cumsum.shape[-1]
    assert states.is_contiguous() and states.dtype == torch.float32, "states: contiguous fp32"
    states_in = torch.empty_like(states, dtype=states_in_dtype)
    final = _boundary_out(final_out, (b, h, p, n), states.device)
    init_arg = _state_arg(initial_states, (b, h, p, n))
    init_scale = _boundary_scale(init_scale, b)
    if base_final is not None:
        assert base_final.shape == final.shape and base_final.dtype == torch.float32 and base_final.is_contiguous()
    block = min(_BLOCK, next_power_of_2(p * n))
    grid = (cdiv(p * n, block), b, h)
    _state_passing_fwd_kernel[grid](
        states, dA_cumsum, *init_arg.pointers, init_scale, seq_idx, base_final, states_in, final,
        p * n, nchunks, seqlen, chunk_size,
        states.stride(0), states.stride(1), states.stride(2), *dA_cumsum.stride(),
        *init_arg.strides, final.stride(0), final.stride(1),
        *(seq_idx.stride() if seq_idx is not None else (0, 0)),
        HAS_INIT=initial_states is not None, INIT_TERMS=init_arg.terms, INIT_SCALED=init_scale is not None,
        HAS_SEQ=seq_idx is not None,
        ONTO_BASE=base_final is not None, BLOCK=block, **opts,
    )
    return states_in, final


def add_initial_state(zero_start, initial_states, dA_cumsum, seqlen, seq_idx=None, states_in_dtype=torch.float32):
    """The state passing from initial_states, given the same pass from zero: zero_start = (its
    states_in (b, c, h, p, n) fp32, its final state (b, h, p, n) fp32). The pass is linear in
    its initial state, so the initial state's own pass (carried through each chunk's decay,
    cut at a document start) is added to the zero-start one, and rounded once -> states_in in
    states_in_dtype, final fp32. Context parallelism's forward: its pass from zero runs before
    the incoming state is known, fused with the chunk states (states_in_fwd) as on one GPU.
    initial_states: (b, h, p, n), or WeightedStates (the gathered states, summed as loaded)."""
    zero_states_in, zero_final = zero_start
    return state_passing_fwd(zero_states_in, dA_cumsum, seqlen, initial_states, seq_idx, states_in_dtype,
                             base_final=zero_final)


def chunk_state_passing_fwd(B, x, dt, dA_cumsum, initial_states=None, seq_idx=None, states_in_dtype=torch.float32,
                            init_scale=None, final_out=None):
    """chunk_state_fwd then state_passing_fwd in one kernel (module docstring): the same
    states_in and final states, without the chunk states in between.

    B: (b, l, g, n)  x: (b, l, h, p)  dt, dA_cumsum: (b, h, c, q)  initial_states: (b, h, p, n),
    times init_scale (b,) fp32 if given
    ->  states_in: (b, c, h, p, n) in states_in_dtype, final_states: (b, h, p, n) fp32, or
    written into final_out (contiguous, in its dtype)"""
    tile, opts = launch.settings("chunk_state_passing_fwd", x.dtype)
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    nchunks, chunk_size = dt.shape[2:]
    states_in = torch.empty(b, nchunks, h, p, n, device=x.device, dtype=states_in_dtype)
    final = _boundary_out(final_out, (b, h, p, n), x.device)   # contiguous, as init is: they share strides
    init_scale = _boundary_scale(init_scale, b)
    if initial_states is not None:
        initial_states = initial_states.contiguous()
    block_p, block_k = launch.block(p, tile), launch.block(chunk_size, tile)
    block_n = launch.grid_dstate_block("chunk_state_passing_fwd", n, cdiv(p, block_p) * b * h, x.dtype)
    grid, heads_fastest = launch.head_grid("chunk_state_passing_fwd", cdiv(p, block_p) * cdiv(n, block_n), b, h)
    _chunk_state_passing_fwd_kernel[grid](
        x, B, dt, dA_cumsum, initial_states, init_scale, seq_idx, states_in, final,
        l, nchunks, chunk_size, p, n, h // g,
        *x.stride(), *B.stride(), *dt.stride(), *launch.seq_strides(seq_idx), *states_in.stride(), *final.stride(),
        HAS_INIT=initial_states is not None, INIT_SCALED=init_scale is not None, HAS_SEQ=seq_idx is not None,
        BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_K=block_k, HEADS_FASTEST=heads_fastest, **opts,
    )
    return states_in, final


def states_in_fwd(B, x, dt, dA_cumsum, initial_states=None, seq_idx=None, states_in_dtype=torch.float32,
                  init_scale=None, final_out=None):
    """The forward's states_in and final states: fused (chunk_state_passing_fwd) where there are
    FUSED_MIN_PAIRS_PER_SM (batch, head) pairs an SM, else chunk_state_fwd then
    state_passing_fwd, whose grids have a chunk axis (same results: tests). initial_states: a
    tensor only (WeightedStates go to add_initial_state), times init_scale (b,) if given; the
    final state written into final_out if given."""
    assert not isinstance(initial_states, WeightedStates), "states_in_fwd: WeightedStates go to add_initial_state"
    if _fused_kernels_fill(x.shape[0], x.shape[2], x.device):
        return chunk_state_passing_fwd(B, x, dt, dA_cumsum, initial_states, seq_idx, states_in_dtype, init_scale,
                                       final_out)
    states = chunk_state_fwd(B, x, dt, dA_cumsum, seq_idx)
    return state_passing_fwd(states, dA_cumsum, x.shape[1], initial_states, seq_idx, states_in_dtype,
                             init_scale=init_scale, final_out=final_out)


def state_passing_bwd(dstates_in, states_in, dA_cumsum, ddA_cumsum, seqlen, dfinal=None,
                      seq_idx=None, need_dinit=False, dstates_dtype=None, onto_base=False, dfinal_scale=None,
                      dinit_out=None):
    # dstates_in: (b, c, h, p, n) fp32  states_in: likewise, fp32 or the forward's narrower dtype
    # dfinal: (b, h, p, n) or WeightedStates  ->  dstates (gradient of each chunk's own state):
    # (b, c, h, p, n) in dstates_dtype, default states_in's (its readers cast it to that for
    # their dots), dinit (b, h, p, n) fp32 or None. onto_base: see add_final_state_grad.
    # dfinal_scale (b,) fp32: dfinal's factor; dinit_out: where dinit goes (see states_in_fwd)
    _, opts = launch.settings("state_passing_bwd")
    b, nchunks, h, p, n = states_in.shape
    chunk_size = dA_cumsum.shape[-1]
    assert dstates_in.is_contiguous() and dstates_in.dtype == torch.float32, "dstates_in: contiguous fp32"
    assert not (onto_base and need_dinit), "add_final_state_grad gives no dinit"
    dstates = torch.empty_like(states_in, dtype=dstates_dtype or states_in.dtype)
    assert need_dinit or dinit_out is None, "dinit_out without need_dinit"
    dinit = _boundary_out(dinit_out, (b, h, p, n), states_in.device) if need_dinit else None
    dfinal_arg = _state_arg(dfinal, (b, h, p, n))
    dfinal_scale = _boundary_scale(dfinal_scale, b)
    block = min(_BLOCK, next_power_of_2(p * n))
    grid = (cdiv(p * n, block), b, h)
    _state_passing_bwd_kernel[grid](
        dstates_in, states_in, dA_cumsum, *dfinal_arg.pointers, dfinal_scale, seq_idx, dstates, dinit, ddA_cumsum,
        p * n, nchunks, seqlen, chunk_size,
        states_in.stride(0), states_in.stride(1), states_in.stride(2), *dA_cumsum.stride(),
        *dfinal_arg.strides, h * p * n, p * n,
        *(seq_idx.stride() if seq_idx is not None else (0, 0)),
        HAS_DFINAL=dfinal is not None, DFINAL_TERMS=dfinal_arg.terms, DFINAL_SCALED=dfinal_scale is not None,
        HAS_DINIT=need_dinit, HAS_SEQ=seq_idx is not None,
        ONTO_BASE=onto_base, BLOCK=block, **opts,
    )
    return dstates, dinit


def add_final_state_grad(through_y, states_in, dA_cumsum, ddA_cumsum, seqlen, dfinal, seq_idx=None):
    """The state passing's backward with a final state's gradient dfinal, given the same
    backward without it (through_y: its dstates, fp32: dstates_bwd's dstates_dtype): linear
    in dfinal, so dfinal's own pass (through each chunk's decay) is added to those dstates and
    rounded once to states_in's dtype, and its part of ddA_cumsum accumulated in place ->
    dstates. Context parallelism's backward: dfinal comes from the later pieces, which need
    this piece's initial state gradient through y first (the pass without dfinal gives it).
    dfinal: (b, h, p, n), or WeightedStates (the gathered gradients, summed as loaded)."""
    dstates, _ = state_passing_bwd(through_y, states_in, dA_cumsum, ddA_cumsum, seqlen, dfinal, seq_idx,
                                   onto_base=True)
    return dstates


def chunk_scan_state_passing_bwd(dy, C, states_in, dA_cumsum, ddA_cumsum, dfinal=None, seq_idx=None,
                                 need_dinit=False, dstates_dtype=None, dfinal_scale=None, dinit_out=None):
    """chunk_scan_bwd_dstates then state_passing_bwd in one kernel (module docstring): the same
    dstates and dinit, without the fp32 d states_in in between; ddA_cumsum accumulated in place.

    dy: (b, l, h, p)  C: (b, l, g, n)  states_in: (b, c, h, p, n)  dA_cumsum: (b, h, c, q)
    dfinal: (b, h, p, n), times dfinal_scale (b,) fp32 if given  ->  dstates (dstates_dtype,
    default states_in's), dinit (b, h, p, n) fp32 (or written into dinit_out, contiguous) or None"""
    tile, opts = launch.settings("chunk_scan_state_passing_bwd", dy.dtype)
    b, l, h, p = dy.shape
    g, n = C.shape[2:]
    nchunks, chunk_size = dA_cumsum.shape[2:]
    dstates = torch.empty_like(states_in, dtype=dstates_dtype or states_in.dtype)
    assert need_dinit or dinit_out is None, "dinit_out without need_dinit"
    dinit = _boundary_out(dinit_out, (b, h, p, n), dy.device) if need_dinit else None
    dfinal = dfinal.contiguous() if dfinal is not None else None
    dfinal_scale = _boundary_scale(dfinal_scale, b)
    block_p, block_k = launch.block(p, tile), launch.block(chunk_size, tile)
    block_n = launch.grid_dstate_block("chunk_scan_state_passing_bwd", n, cdiv(p, block_p) * b * h, dy.dtype)
    grid, heads_fastest = launch.head_grid("chunk_scan_state_passing_bwd", cdiv(p, block_p) * cdiv(n, block_n), b, h)
    init_strides = (h * p * n, p * n, n, 1)   # dfinal and dinit: contiguous (b, h, p, n)
    _chunk_scan_state_passing_bwd_kernel[grid](
        dy, C, states_in, dA_cumsum, dfinal, dfinal_scale, seq_idx, dstates, dinit, ddA_cumsum,
        l, nchunks, chunk_size, p, n, h // g,
        *dy.stride(), *C.stride(), *dA_cumsum.stride(), *launch.seq_strides(seq_idx), *states_in.stride(),
        *init_strides,
        HAS_DFINAL=dfinal is not None, DFINAL_SCALED=dfinal_scale is not None, HAS_DINIT=need_dinit,
        HAS_SEQ=seq_idx is not None, BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_K=block_k, HEADS_FASTEST=heads_fastest,
        **opts,
    )
    return dstates, dinit


def dstates_bwd(dy, C, states_in, dA_cumsum, ddA_cumsum, dfinal=None, seq_idx=None, need_dinit=False,
                dstates_dtype=None, dfinal_scale=None, dinit_out=None):
    """The backward's dstates and dinit: fused (chunk_scan_state_passing_bwd) where there are
    FUSED_MIN_PAIRS_PER_SM (batch, head) pairs an SM, else chunk_scan_bwd_dstates then
    state_passing_bwd (same results: tests). dfinal: a tensor only (WeightedStates go to
    add_final_state_grad), times dfinal_scale (b,) if given; dinit written into dinit_out if
    given."""
    assert not isinstance(dfinal, WeightedStates), "dstates_bwd: WeightedStates go to add_final_state_grad"
    if _fused_kernels_fill(dy.shape[0], dy.shape[2], dy.device):
        return chunk_scan_state_passing_bwd(dy, C, states_in, dA_cumsum, ddA_cumsum, dfinal, seq_idx, need_dinit,
                                            dstates_dtype, dfinal_scale, dinit_out)
    dstates_in = chunk_scan_bwd_dstates(dy, C, dA_cumsum, seq_idx)
    return state_passing_bwd(dstates_in, states_in, dA_cumsum, ddA_cumsum, dy.shape[1], dfinal, seq_idx, need_dinit,
                             dstates_dtype, dfinal_scale=dfinal_scale, dinit_out=dinit_out)
