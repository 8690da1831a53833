"""The Triton SSD (`kernels.triton_ssd.ssd_triton`) against the float64 torch reference.

On a machine without CUDA the kernels run under Triton's CPU interpreter
(TRITON_INTERPRET=1, set here before the kernels are imported) at small shapes; with CUDA
the same small-shape tests run compiled, and the `gpu` tests add real shapes in bf16 against
the fp32 reference and against mamba_ssm's `mamba_chunk_scan_combined` (when importable).

Every check is ‖ours − ref‖ / ‖ref‖ on the output, the final state and each gradient, with
the bound written beside it.
"""

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from kernels.reference import ssd_chunked, ssd_sequential  # noqa: E402
from kernels.triton_ssd import chunk_cumsum as _stage  # noqa: E402
from kernels.triton_ssd import launch  # noqa: E402
from kernels.triton_ssd import ssd_triton  # noqa: E402
from triton_device import triton_device  # noqa: E402

DEVICE = triton_device(_stage._chunk_cumsum_fwd_kernel, "kernels.triton_ssd")
# fp32 inputs: the interpreter computes tl.dot in fp32; a GPU uses tf32 for fp32 dots
FP32_BOUND = 1e-5 if DEVICE == "cpu" else 5e-3
BF16_BOUND = 2e-2
GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def make_inputs(b, l, h, p, g, n, *, dtype=torch.float32, device=DEVICE, D="head", z=True, dt_bias=True,
                initial_states=True, docs=0, first_doc=0, seed=0):
    """Random inputs in the ranges a Mamba-2 layer sees; `docs` extra document starts per row."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    inputs = dict(
        x=randn(b, l, h, p),
        dt=randn(b, l, h, scale=0.5) - 1.0,
        A=-(torch.rand(h, generator=gen) * 3 + 0.2).to(device=device, dtype=dtype),
        B=randn(b, l, g, n, scale=n ** -0.5),
        C=randn(b, l, g, n, scale=n ** -0.5),
        D={"head": randn(h), "channel": randn(h, p), None: None}[D],
        z=randn(b, l, h, p) if z else None,
        dt_bias=randn(h, scale=0.5) if dt_bias else None,
        initial_states=randn(b, h, p, n) if initial_states else None,
        seq_idx=None,
    )
    if docs:
        seq_idx = torch.full((b, l), first_doc, dtype=torch.int32)
        for row in range(b):
            for start in torch.randint(1, l, (docs,), generator=gen).tolist():
                seq_idx[row, start:] += 1
        inputs["seq_idx"] = seq_idx.to(device)
    return inputs


def run(fn, inputs, out_grad_seed=1, **kwargs):
    """y, final state and the gradients of <y, gy> + <final, gf> for random gy, gf."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in GRAD_NAMES and v is not None else v)
              for k, v in inputs.items()}
    y, final = fn(**leaves, return_final_states=True, **kwargs)
    gen = torch.Generator().manual_seed(out_grad_seed)
    gy = torch.randn(y.shape, generator=gen).to(y)
    gf = torch.randn(final.shape, generator=gen).to(final)
    ((y.float() * gy.float()).sum() + (final.float() * gf.float()).sum()).backward()
    grads = {k: leaves[k].grad for k in GRAD_NAMES if leaves[k] is not None}
    return y, final, grads


def upcast(inputs, dtype=torch.float64, device=None):
    return {k: (v.to(device=device or v.device, dtype=dtype) if v is not None and v.is_floating_point()
                else (v.to(device or v.device) if v is not None else None))
            for k, v in inputs.items()}


def rel_err(ours, ref):
    ref = ref.double()
    return ((ours.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_all(ours, ref, bound, what=""):
    """Compare (y, final, grads) triples; return the errors, assert each is under `bound`."""
    (y, final, grads), (y_ref, final_ref, grads_ref) = ours, ref
    errors = {"y": rel_err(y, y_ref), "final_states": rel_err(final, final_ref)}
    assert set(grads) == set(grads_ref)
    for name in grads:
        assert grads[name] is not None, f"{what}: no gradient for {name}"
        errors["d" + name] = rel_err(grads[name], grads_ref[name])
    for name, err in errors.items():
        assert math.isfinite(err) and err < bound, f"{what}: {name} relative error {err:.2e} >= {bound:.0e}; all: {errors}"
    return errors


# (b, l, h, p, g, n, chunk_size, options): each line one behaviour; lengths are not multiples
# of the chunk unless said otherwise
CASES = {
    "all_options_g2": (2, 45, 4, 16, 2, 16, 16, dict(D="channel", docs=3, dt_limit=(0.05, 2.0))),
    "plain_g1_multiple_of_chunk": (1, 64, 2, 16, 1, 16, 32, dict(D="head", z=False, dt_bias=False,
                                                                 initial_states=False)),
    "chunk64_docs_init": (1, 100, 2, 16, 1, 32, 64, dict(D="head", z=False, docs=2)),
    "last_chunk_one_token": (2, 33, 2, 16, 1, 16, 16, dict(D=None, z=True, dt_limit=(0.0, 0.3))),
    "no_softplus": (1, 40, 2, 16, 2, 16, 16, dict(D="head", dt_softplus=False)),
    "odd_dims_heads_per_group_3": (1, 50, 6, 24, 2, 20, 32, dict(D="channel", docs=2)),
    "many_docs_first_id_7": (2, 70, 2, 16, 1, 16, 16, dict(D="head", docs=9, first_doc=7)),
    "chunk24_not_power_of_two": (1, 50, 2, 16, 1, 16, 24, dict(D="channel", docs=1)),
    "one_token": (2, 1, 2, 16, 1, 16, 16, dict(D="head")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_every_gradient_match_float64_reference(case):
    b, l, h, p, g, n, chunk_size, opts = CASES[case]
    opts = dict(opts)
    kwargs = {k: opts.pop(k) for k in ("dt_limit", "dt_softplus") if k in opts}
    inputs = make_inputs(b, l, h, p, g, n, **opts)
    if kwargs.get("dt_softplus") is False:
        # dt used as is: mostly positive, some below the clamp's lower bound 0 (zero gradient there)
        inputs["dt"] = inputs["dt"].abs() * 0.3 - 0.02
    ours = run(ssd_triton, inputs, chunk_size=chunk_size, **kwargs)
    ref = run(ssd_chunked, upcast(inputs), chunk_size=chunk_size, **kwargs)
    check_all(ours, ref, FP32_BOUND, case)


@pytest.mark.parametrize("heads_per_program, dtype", [
    (1, torch.float32), (2, torch.float32),
    pytest.param(2, torch.bfloat16, marks=pytest.mark.gpu),   # the partials' sum cast back to bf16
])
def test_group_heads_split_over_programs(heads_per_program, dtype, monkeypatch):
    # launch.head_split: a group's 3 heads over 3 programs (1 each) or 2 (2 + 1), their fp32
    # partials summed; the first split alone adds the intra-chunk parts of dB and dC. Tiles of
    # 16 in chunks of 32: two row tiles per chunk, so the tiles above the diagonal are skipped
    # and the intra-chunk loops start past the first tile.
    for name in launch.HEAD_SPLIT_LAUNCHERS:
        monkeypatch.setitem(launch.SETTINGS, name, {**launch.SETTINGS.get(name, {}),
                                                   "heads_per_program": heads_per_program, "tile": 16})
    assert launch.head_split("bmm_bwd_dcb", 3, 8) == ((3, 1) if heads_per_program == 1 else (2, 2))
    inputs = make_inputs(1, 50, 6, 24, 2, 20, dtype=dtype, D="channel", docs=2)
    ours = run(ssd_triton, inputs, chunk_size=32)
    ref = run(ssd_chunked, upcast(inputs), chunk_size=32)
    check_all(ours, ref, FP32_BOUND if dtype == torch.float32 else BF16_BOUND,
              f"heads_per_program={heads_per_program} {dtype}")


@pytest.mark.parametrize("heads_per_program", [3, 1], ids=["one_split", "three_splits"])
def test_db_and_dc_written_into_strided_outputs(heads_per_program, monkeypatch):
    # the mixer body's case: B and C views of one conv output, and dB, dC written into the two
    # halves of one tensor (its conv's gradient, no cat), directly or from the splits' sum:
    # the same values as the contiguous outputs
    from kernels.triton_ssd.combined import ssd_bwd, ssd_fwd

    for name in ("chunk_state_bwd_db", "chunk_scan_bwd_dc"):
        monkeypatch.setitem(launch.SETTINGS, name, {**launch.SETTINGS.get(name, {}),
                                                   "heads_per_program": heads_per_program})
    inputs = make_inputs(1, 50, 6, 24, 2, 20, D="channel", docs=2)
    b, l, g, n = inputs["B"].shape
    BC = torch.cat([inputs["B"].flatten(2), inputs["C"].flatten(2)], dim=-1)
    B, C = (t.view(b, l, g, n) for t in BC.split(g * n, dim=-1))
    args = (inputs["x"], inputs["dt"], inputs["A"], B, C, 32, inputs["D"], None, inputs["dt_bias"], None,
            inputs["seq_idx"])
    y, _, _, states_in = ssd_fwd(*args, True, (0.0, math.inf))
    dout = torch.randn_like(y)
    grads = ssd_bwd(dout, None, *args, None, states_in, True, (0.0, math.inf), need_dinit=False)
    dBC = torch.full_like(BC, float("nan"))
    dB, dC = (t.view(b, l, g, n) for t in dBC.split(g * n, dim=-1))
    into = ssd_bwd(dout, None, *args, None, states_in, True, (0.0, math.inf), need_dinit=False,
                   dB_out=dB, dC_out=dC)
    assert into[3].data_ptr() == dB.data_ptr() and into[4].data_ptr() == dC.data_ptr()
    torch.testing.assert_close(dB, grads[3], rtol=1e-6, atol=1e-6)   # atomics add in no fixed order
    torch.testing.assert_close(dC, grads[4], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_split_sum_writes_the_partials_sum_into_strided_outputs(out_dtype):
    # launch.sum_splits' kernel: 3 fp32 partials of (b, l, g, n) summed in fp32 and rounded once
    # into a contiguous output, into one half of a wider tensor (dB's place in the conv's
    # gradient: (g, n) and (b, l) merge, l with g not), and into a transposed view (no
    # unit column stride: torch's sum instead); ragged sizes exercise the tile masks
    from kernels.triton_ssd.split_sum import split_sum

    partials = torch.randn(3, 2, 37, 2, 20, device=DEVICE)
    total = partials[0] + partials[1] + partials[2]   # the kernel's order
    if DEVICE == "cpu" and out_dtype == torch.bfloat16:   # torch and a GPU round; the interpreter truncates
        total = (total.view(torch.int32) & ~0xFFFF).view(torch.float32)
    contiguous = split_sum(partials, torch.empty(partials.shape[1:], dtype=out_dtype, device=DEVICE))
    wide = torch.full((2, 37, 100), float("nan"), dtype=out_dtype, device=DEVICE)
    half = wide[..., 30:70].view(2, 37, 2, 20)
    assert split_sum(partials, half).data_ptr() == half.data_ptr()
    transposed = torch.empty((20, 2, 37, 2), dtype=out_dtype, device=DEVICE).permute(1, 2, 3, 0)
    split_sum(partials, transposed)
    assert torch.equal(transposed, partials.sum(0).to(out_dtype)), "transposed (torch's sum)"
    # a view whose only 2-D form has columns 30 apart (its trailing dim of size 1 merged with
    # the one before) and one whose rows would overlap (expand's stride 0): torch's sum,
    # nothing written outside the view
    grid = torch.full((2, 37, 30), float("nan"), dtype=out_dtype, device=DEVICE)
    corner = grid[:, :5, :1]
    small = torch.randn(2, *corner.shape, device=DEVICE)
    split_sum(small, corner)
    assert torch.equal(corner, small.sum(0).to(out_dtype)), "columns 30 apart (torch's sum)"
    assert grid[:, 5:].isnan().all() and grid[..., 1:].isnan().all()
    overlapping = torch.zeros(37, 2, dtype=out_dtype, device=DEVICE).expand(3, 37, 2)
    with pytest.raises(RuntimeError):   # torch refuses to write into overlapping memory too
        split_sum(torch.randn(2, 3, 37, 2, device=DEVICE), overlapping)
    for name, got in (("contiguous", contiguous), ("strided", half)):
        assert torch.equal(got, total.to(out_dtype)), name
    assert wide[..., :30].isnan().all() and wide[..., 70:].isnan().all()   # nothing written outside


def test_head_split_fills_the_grid_to_its_target_evenly(monkeypatch):
    monkeypatch.setitem(launch.SETTINGS, "bmm_bwd_dcb", {"grid_programs": 2048})
    assert launch.head_split("bmm_bwd_dcb", 64, 512) == (4, 16)     # 1.3b: b4, 8 chunks, 16 tiles
    assert launch.head_split("bmm_bwd_dcb", 24, 2048) == (1, 24)    # 130m: b16 fills the grid alone
    assert launch.head_split("bmm_bwd_dcb", 24, 4096) == (1, 24)    # never fewer than one split
    assert launch.head_split("bmm_bwd_dcb", 24, 300) == (6, 4)      # 6 splits asked, 4 heads each
    assert launch.head_split("bmm_bwd_dcb", 24, 400) == (5, 5)      # 5 asked: 5 + 5 + 5 + 5 + 4
    assert launch.head_split("bmm_bwd_dcb", 3, 1) == (3, 1)         # at most one head a program


def test_heads_go_first_where_the_setting_says(monkeypatch):
    # launch.head_grid: True always; a fraction of the L2 when the tensor every head re-reads is larger
    cb = torch.empty(4, 8, 1, 16, 16)   # 32 KiB of fp32
    monkeypatch.setattr(launch, "l2_bytes", lambda device: 48 * 1024)
    for option, first in ((None, False), (True, True), (0.5, True), (0.75, False)):
        monkeypatch.setitem(launch.SETTINGS, "chunk_scan_fwd", {"heads_fastest": option})
        grid, heads_first = launch.head_grid("chunk_scan_fwd", 3, 32, 6, shared=cb)
        assert (grid, heads_first) == (((6, 3, 32), True) if first else ((3, 32, 6), False)), option
    assert launch.head_grid("chunk_scan_fwd", 3, 32, 6)[1] is False   # a fraction needs the tensor


def poison_unread_cb(monkeypatch):
    """CB above the diagonal and past the last chunk's end made NaN: the kernels load CB tiles
    whole (bounds-only masks) and must drop those entries by select, never by multiplying
    with a zero."""
    from kernels.triton_ssd import combined
    bmm_fwd = combined.bmm_fwd

    def poisoned_bmm_fwd(C, B, chunk_size, *args, **kwargs):
        cb = bmm_fwd(C, B, chunk_size, *args, **kwargs)
        above = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=cb.device).triu(1)
        cb = cb.masked_fill(above, float("nan"))
        last_len = C.shape[1] - (cb.shape[1] - 1) * chunk_size
        cb[:, -1, :, last_len:, :] = float("nan")
        cb[:, -1, :, :, last_len:] = float("nan")
        return cb

    monkeypatch.setattr(combined, "bmm_fwd", poisoned_bmm_fwd)


@pytest.mark.parametrize("tile, tile_k, heads_fastest, fused", [(16, 32, True, True), (32, 16, False, False)])
def test_other_launch_settings_give_the_same_result(monkeypatch, tile, tile_k, heads_fastest, fused):
    # the settings a sweep may pick change tiles, not maths: narrow tiles everywhere, dstate in
    # two tiles ("tile_dstate"), one head per chunk_cumsum program ("block_h"), causal loops
    # stepping wider than their row tiles (reading CB tiles that bmm_fwd never wrote, which
    # the causal select must drop) or narrower ("tile_k"), and grids either way round
    # ("heads_fastest"); the state passings fused or as two stages, on either device
    from kernels.triton_ssd import state_passing
    monkeypatch.setattr(state_passing, "_fused_kernels_fill", lambda *_: fused)
    for name in ("chunk_cumsum_fwd", "chunk_cumsum_bwd", "chunk_state_passing_fwd", "chunk_state_fwd",
                 "state_passing_fwd", "bmm_fwd", "chunk_scan_fwd", "chunk_scan_state_passing_bwd",
                 "chunk_scan_bwd_dstates", "state_passing_bwd", "chunk_scan_bwd_dx", "bmm_bwd_dcb",
                 "chunk_scan_bwd_dc", "chunk_state_bwd_db"):
        monkeypatch.setitem(launch.SETTINGS, name, {"tile": tile, "tile_dstate": 16, "block_h": 1, "tile_k": tile_k,
                                                   "heads_fastest": heads_fastest})
    assert launch.dstate_block("chunk_scan_fwd", 20) == 16
    assert launch.k_block("chunk_scan_fwd", 32) == tile_k
    poison_unread_cb(monkeypatch)
    inputs = make_inputs(1, 50, 6, 24, 2, 20, D="channel", docs=2)
    ours = run(ssd_triton, inputs, chunk_size=32)
    ref = run(ssd_chunked, upcast(inputs), chunk_size=32)
    check_all(ours, ref, FP32_BOUND, f"tile {tile}, tile_k {tile_k}")


# At decays this strong, lanes that the causal select then discards overflow (exp of the
# difference above the diagonal, or of a padding row's); the interpreter's numpy says so
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning",
                            "ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("tile, tile_k, dt_shift, dt_softplus, dt_limit", [
    (16, 16, -2.0, True, (0.0, math.inf)),     # dt ~ 0.05: the factored tiles carry much of y and its gradients
    (16, 32, -2.0, True, (0.0, math.inf)),     # causal loops stepping wider than their row tiles
    (32, 16, -2.0, True, (0.0, math.inf)),     # ... and narrower (two steps to a row tile's diagonal band)
    (16, 16, 2.5, True, (0.0, math.inf)),      # dt ~ 3: the factors underflow inside a chunk
    (16, 16, None, False, (-0.05, math.inf)),  # dt may be negative: not monotone, the exact exp throughout
])
def test_factored_decay_matches_float64_reference(monkeypatch, tile, tile_k, dt_shift, dt_softplus, dt_limit):
    # Row tiles of 16 or 32 tokens in 64-token chunks: most source tiles lie wholly before their
    # target tiles, where the causal loops factor the decay (combined.py: factored decay).
    # Against float64 the interpreter's bound is looser than FP32_BOUND: at strong decays dA's sum
    # over tokens cancels in fp32 (4.5e-5 on CPU, the same with the exact exp); a GPU's tf32 dots
    # dominate that (1.4e-3 at most on an H100), so there FP32_BOUND holds. Against the exact
    # exp in fp32 the factored kernels must agree to FP32_BOUND.
    float64_bound = 2e-4 if DEVICE == "cpu" else FP32_BOUND
    from kernels.triton_ssd import combined
    for name in launch.K_LAUNCHERS:
        monkeypatch.setitem(launch.SETTINGS, name, {"tile": tile, "tile_k": tile_k})
    monkeypatch.setitem(launch.SETTINGS, "bmm_bwd_dcb", {"tile": tile})
    assert combined.dt_nonnegative(dt_softplus, dt_limit) == dt_softplus
    poison_unread_cb(monkeypatch)
    inputs = make_inputs(1, 150, 2, 16, 1, 16, D="head", docs=2)
    inputs["dt"] = inputs["dt"] + dt_shift if dt_softplus else inputs["dt"].abs() * 0.3 - 0.02
    kwargs = dict(dt_softplus=dt_softplus, dt_limit=dt_limit)
    what = f"tile {tile}, tile_k {tile_k}, dt shift {dt_shift}"
    ours = run(ssd_triton, inputs, chunk_size=64, **kwargs)
    check_all(ours, run(ssd_chunked, upcast(inputs), chunk_size=64, **kwargs), float64_bound, what + ", against float64")
    if dt_softplus:   # otherwise the kernels ran the exact exp already
        monkeypatch.setattr(combined, "dt_nonnegative", lambda *_: False)
        exact = run(ssd_triton, inputs, chunk_size=64, **kwargs)
        check_all(ours, exact, FP32_BOUND, what + ", against the exact exp")


def test_half_precision_states_in_give_the_same_output():
    # the forward stores states_in in C's dtype: chunk_scan_fwd casts them to it for its dot
    # anyway, so y must be bit-identical to the fp32 states_in's
    from kernels.triton_ssd import bmm, chunk_cumsum, chunk_scan, chunk_state, state_passing
    inputs = make_inputs(1, 45, 4, 16, 2, 16, dtype=torch.float16, D="channel", docs=2)
    x, dt, A, B, C, D, seq_idx = (inputs[k] for k in ("x", "dt", "A", "B", "C", "D", "seq_idx"))
    dt_out, dA_cumsum = chunk_cumsum.chunk_cumsum_fwd(dt, A, 16, inputs["dt_bias"], True)
    states = chunk_state.chunk_state_fwd(B, x, dt_out, dA_cumsum, seq_idx)
    cb = bmm.bmm_fwd(C, B, 16)
    outputs = []
    for dtype in (torch.float32, torch.float16):
        states_in, _ = state_passing.state_passing_fwd(states, dA_cumsum, x.shape[1], inputs["initial_states"],
                                                       seq_idx, dtype)
        assert states_in.dtype == dtype
        outputs.append(chunk_scan.chunk_scan_fwd(cb, x, dt_out, dA_cumsum, C, states_in, D, None, seq_idx)[0])
    assert torch.equal(*outputs)


@pytest.mark.parametrize("docs, first_doc, initial_states", [(2, 0, True), (0, 0, False), (3, 1, True)])
def test_fused_state_passing_matches_the_two_stages(docs, first_doc, initial_states):
    # chunk_state_passing_fwd (the forward's path) against chunk_state_fwd then
    # state_passing_fwd (context parallelism's path): the same sums in the same order, so the
    # interpreter gives equal bits; a GPU may order a dot's products differently between them
    from kernels.triton_ssd import chunk_cumsum, chunk_state, state_passing
    inputs = make_inputs(2, 45, 4, 16, 2, 16, D="channel", docs=docs, first_doc=first_doc,
                         initial_states=initial_states)
    x, dt, A, B, seq_idx, init = (inputs[k] for k in ("x", "dt", "A", "B", "seq_idx", "initial_states"))
    dt_out, dA_cumsum = chunk_cumsum.chunk_cumsum_fwd(dt, A, 16, inputs["dt_bias"], True)
    states = chunk_state.chunk_state_fwd(B, x, dt_out, dA_cumsum, seq_idx)
    for dtype in (torch.float32, torch.float16):
        two_stages = state_passing.state_passing_fwd(states, dA_cumsum, x.shape[1], init, seq_idx, dtype)
        fused = state_passing.chunk_state_passing_fwd(B, x, dt_out, dA_cumsum, init, seq_idx, dtype)
        for name, ours, theirs in zip(("states_in", "final"), fused, two_stages):
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            if DEVICE == "cpu":
                assert torch.equal(ours, theirs), f"{name} ({dtype})"
            else:
                bound = 1e-6 if dtype == torch.float32 else 1e-3   # fp16: one rounding apart at most
                assert rel_err(ours, theirs) <= bound, f"{name} ({dtype})"


@pytest.mark.parametrize("docs, first_doc, dfinal, need_dinit", [(2, 0, True, True), (0, 0, False, False),
                                                                 (3, 1, True, False)])
def test_fused_state_passing_bwd_matches_the_two_stages(docs, first_doc, dfinal, need_dinit):
    # chunk_scan_state_passing_bwd (the backward's path) against chunk_scan_bwd_dstates then
    # state_passing_bwd (context parallelism's): dstates and dinit as in the forward's test;
    # ddA_cumsum's sums of <G, S> run over other tiles, so they agree to rounding
    from kernels.triton_ssd import chunk_cumsum, chunk_scan, state_passing
    inputs = make_inputs(2, 45, 4, 16, 2, 16, docs=docs, first_doc=first_doc)
    x, dt, A, B, C, seq_idx, init = (inputs[k] for k in ("x", "dt", "A", "B", "C", "seq_idx", "initial_states"))
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(x.shape, generator=gen).to(x.device)
    d_final = torch.randn(init.shape, generator=gen).to(x.device) if dfinal else None
    dt_out, dA_cumsum = chunk_cumsum.chunk_cumsum_fwd(dt, A, 16, inputs["dt_bias"], True)
    states_in, _ = state_passing.chunk_state_passing_fwd(B, x, dt_out, dA_cumsum, init, seq_idx)
    ddA_two, ddA_fused = torch.zeros_like(dA_cumsum), torch.zeros_like(dA_cumsum)
    dstates_in = chunk_scan.chunk_scan_bwd_dstates(dy, C, dA_cumsum, seq_idx)
    two_stages = state_passing.state_passing_bwd(dstates_in, states_in, dA_cumsum, ddA_two, x.shape[1], d_final,
                                                 seq_idx, need_dinit)
    fused = state_passing.chunk_scan_state_passing_bwd(dy, C, states_in, dA_cumsum, ddA_fused, d_final, seq_idx,
                                                       need_dinit)
    for name, ours, theirs in zip(("dstates", "dinit"), fused, two_stages):
        if theirs is None:
            assert ours is None, name
            continue
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        if DEVICE == "cpu":
            assert torch.equal(ours, theirs), name
        else:
            assert rel_err(ours, theirs) <= 1e-6, name
    assert rel_err(ddA_fused, ddA_two) <= 1e-6


@pytest.mark.parametrize("docs, first_doc, fused", [(0, 0, True), (2, 0, True), (3, 1, True), (3, 1, False)])
def test_incoming_state_added_onto_the_zero_start_pass_equals_the_pass_from_it(docs, first_doc, fused,
                                                                               monkeypatch):
    # context parallelism's state passing: the pass from zero first (fused, as on one GPU),
    # then the incoming state's part added (add_initial_state), against the pass from the
    # incoming state; backward, the pass without the final state's gradient, then its part
    # added (add_final_state_grad), against the pass with it. Linear in the boundary state, so
    # equal up to fp32 rounding; a document start inside the piece cuts the boundary's part
    # (fused: the one-GPU path states_in_fwd and dstates_bwd take on a full grid, else the two
    # stages, as on a GPU at few (batch, head) pairs)
    from kernels.triton_ssd import chunk_cumsum, chunk_scan, chunk_state, state_passing
    monkeypatch.setattr(state_passing, "_fused_kernels_fill", lambda *_: fused)
    inputs = make_inputs(2, 45, 4, 16, 2, 16, docs=docs, first_doc=first_doc)
    x, dt, A, B, C, seq_idx, init = (inputs[k] for k in ("x", "dt", "A", "B", "C", "seq_idx", "initial_states"))
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(x.shape, generator=gen).to(x.device)
    d_final = torch.randn(init.shape, generator=gen).to(x.device)
    dt_out, dA_cumsum = chunk_cumsum.chunk_cumsum_fwd(dt, A, 16, inputs["dt_bias"], True)
    states = chunk_state.chunk_state_fwd(B, x, dt_out, dA_cumsum, seq_idx)
    zero_start = state_passing.states_in_fwd(B, x, dt_out, dA_cumsum, None, seq_idx)
    assert zero_start[0].dtype == torch.float32
    for dtype, bound in ((torch.float32, 1e-6), (torch.float16, 1e-3)):
        direct = state_passing.state_passing_fwd(states, dA_cumsum, x.shape[1], init, seq_idx, dtype)
        added = state_passing.add_initial_state(zero_start, init, dA_cumsum, x.shape[1], seq_idx, dtype)
        for name, ours, theirs in zip(("states_in", "final"), added, direct):
            assert ours.dtype == theirs.dtype and rel_err(ours, theirs) <= bound, f"{name} ({dtype})"
    states_in = direct[0]   # fp16, as training keeps them
    dstates_in = chunk_scan.chunk_scan_bwd_dstates(dy, C, dA_cumsum, seq_idx)
    ddA_direct, ddA_added = torch.zeros_like(dA_cumsum), torch.zeros_like(dA_cumsum)
    direct, _ = state_passing.state_passing_bwd(dstates_in, states_in, dA_cumsum, ddA_direct, x.shape[1], d_final,
                                                seq_idx)
    through_y, _ = state_passing.dstates_bwd(dy, C, states_in, dA_cumsum, ddA_added, None, seq_idx,
                                             dstates_dtype=torch.float32)
    assert through_y.dtype == torch.float32
    added = state_passing.add_final_state_grad(through_y, states_in, dA_cumsum, ddA_added, x.shape[1], d_final,
                                               seq_idx)
    assert added.dtype == direct.dtype == torch.float16 and rel_err(added, direct) <= 1e-3, "dstates"
    assert rel_err(ddA_added, ddA_direct) <= 1e-6, "ddA_cumsum"


@pytest.mark.parametrize("terms, layout", [(3, "strided"), (1, "contiguous"), (3, "packed_bf16")])
def test_boundary_state_as_weighted_states_equals_their_sum(terms, layout):
    # context parallelism hands the boundary states over unsummed (WeightedStates: the gathered
    # pieces' states and log decays, views of the packed all-gather buffer, and which decays
    # weigh each state, where it reaches); the state passing forms the weights and the sum as
    # it loads them: the same as passing the sum, up to fp32 rounding
    from kernels.reference.ssd import WeightedStates
    from kernels.triton_ssd import chunk_cumsum, state_passing
    inputs = make_inputs(2, 45, 4, 16, 2, 16, docs=2, first_doc=0)
    x, dt, A, B, C, seq_idx, init = (inputs[k] for k in ("x", "dt", "A", "B", "C", "seq_idx", "initial_states"))
    b, h, p, n = init.shape
    gen = torch.Generator().manual_seed(2)
    if layout == "strided":   # as ContextParallel._pack lays out fp32 states: (k, b, h·p·n + h), log decays last
        # sliced on the device: .to(device) of a tensor with gaps makes it contiguous
        packed = torch.randn(terms, b, h * p * n + h, generator=gen).to(x.device)
        states, log_totals = packed[..., :-h].reshape(terms, b, h, p, n), packed[..., -h:]
    elif layout == "packed_bf16":   # what the all-gather of bf16 states gives: each rank's _pack, stacked
        from mamba_train.parallel.context_parallel import ContextParallel
        every = torch.stack([ContextParallel._pack(torch.randn(b, h, p, n, generator=gen).to(x.device),
                                                   -torch.rand(b, h, generator=gen).to(x.device), torch.bfloat16)
                             for _ in range(terms)])
        states, log_totals = ContextParallel._unpack(every, init.shape)
    else:
        states = torch.randn(terms, b, h, p, n, generator=gen).to(x.device)
        log_totals = torch.randn(terms, b, h, generator=gen).to(x.device)
    coef = (torch.rand(terms, terms, generator=gen) < 0.6).float().to(x.device)
    reach = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]][:terms]).to(x.device)   # (k, b): each 0 and 1
    boundary = WeightedStates(states, log_totals, coef, reach)
    assert boundary.states.is_contiguous() == (layout == "contiguous")
    weights = boundary.weights()
    assert (weights[reach == 0] == 0).all() and (weights[reach == 1] > 0).all()
    dt_out, dA_cumsum = chunk_cumsum.chunk_cumsum_fwd(dt, A, 16, inputs["dt_bias"], True)
    zero_start = state_passing.states_in_fwd(B, x, dt_out, dA_cumsum, None, seq_idx)
    summed_in_kernel = state_passing.add_initial_state(zero_start, boundary, dA_cumsum, x.shape[1], seq_idx)
    summed_before = state_passing.add_initial_state(zero_start, boundary.sum(), dA_cumsum, x.shape[1], seq_idx)
    for name, ours, theirs in zip(("states_in", "final"), summed_in_kernel, summed_before):
        assert rel_err(ours, theirs) <= 1e-6, name
    states_in = summed_before[0]
    dy = torch.randn(x.shape, generator=gen).to(x.device)
    ddA_in_kernel, ddA_before = torch.zeros_like(dA_cumsum), torch.zeros_like(dA_cumsum)
    through_y, _ = state_passing.dstates_bwd(dy, C, states_in, dA_cumsum, ddA_before, None, seq_idx,
                                             dstates_dtype=torch.float32)
    ddA_in_kernel.copy_(ddA_before)
    dstates_in_kernel = state_passing.add_final_state_grad(through_y, states_in, dA_cumsum, ddA_in_kernel, x.shape[1],
                                                           boundary, seq_idx)
    dstates_before = state_passing.add_final_state_grad(through_y, states_in, dA_cumsum, ddA_before, x.shape[1],
                                                        boundary.sum(), seq_idx)
    assert rel_err(dstates_in_kernel, dstates_before) <= 1e-6, "dstates"
    assert rel_err(ddA_in_kernel, ddA_before) <= 1e-6, "ddA_cumsum"
    # a state that reaches no row adds nothing, though its log weight overflows exp
    unreached = boundary._replace(log_totals=torch.full_like(log_totals, 200.0), coef=torch.ones_like(coef),
                                  reach=torch.zeros_like(reach))
    for name, ours, theirs in zip(("states_in", "final"),
                                  state_passing.add_initial_state(zero_start, unreached, dA_cumsum, x.shape[1], seq_idx),
                                  state_passing.add_initial_state(zero_start, None, dA_cumsum, x.shape[1], seq_idx)):
        assert torch.equal(ours, theirs), name
    with pytest.raises(AssertionError, match="fp32 log_totals"):
        state_passing.add_initial_state(zero_start, boundary._replace(log_totals=log_totals.half()), dA_cumsum,
                                        x.shape[1], seq_idx)


@pytest.mark.parametrize("slot_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_stages"])
def test_relayed_state_scaled_as_loaded_and_written_into_its_slot(monkeypatch, fused, slot_dtype):
    # context parallelism's relay: the incoming state (bf16, as relayed) times a per-row scale (0
    # where a document starts at the border) as the kernel loads it, and this piece's final state
    # (forward) or initial state's gradient (backward) written into a given slot: the same as the
    # state scaled before the call (a 0 or 1 scale is exact) and the result cast after it, for
    # the fused kernels and the two stages. Bit for bit in an fp32 slot; a bf16 slot within its
    # rounding (the interpreter's cast to bf16 truncates, the GPU's rounds to nearest)
    from kernels.triton_ssd import chunk_cumsum, state_passing
    monkeypatch.setattr(state_passing, "_fused_kernels_fill", lambda *shape: fused)

    def assert_in_slot(slot, want):
        if slot.dtype == torch.float32:
            assert torch.equal(slot, want)
        else:   # within one bf16 step (8 significant bits) of the fp32 value
            assert ((slot.float() - want).abs() <= want.abs() * 2.0 ** -7).all()

    inputs = make_inputs(2, 45, 4, 16, 2, 16, docs=2, first_doc=0)
    x, dt, A, B, C, seq_idx, init = (inputs[k] for k in ("x", "dt", "A", "B", "C", "seq_idx", "initial_states"))
    gen = torch.Generator().manual_seed(4)
    incoming = init.to(torch.bfloat16)
    scale = torch.tensor([0.0, 1.0], device=x.device)
    scaled = incoming.float() * scale[:, None, None, None]
    dt_out, dA_cumsum = chunk_cumsum.chunk_cumsum_fwd(dt, A, 16, inputs["dt_bias"], True)
    slot = torch.empty_like(incoming, dtype=slot_dtype)
    states_in, final = state_passing.states_in_fwd(B, x, dt_out, dA_cumsum, incoming, seq_idx, torch.bfloat16,
                                                   init_scale=scale, final_out=slot)
    want_states_in, want_final = state_passing.states_in_fwd(B, x, dt_out, dA_cumsum, scaled, seq_idx, torch.bfloat16)
    assert final is slot and torch.equal(states_in, want_states_in)
    assert_in_slot(slot, want_final)

    dy = torch.randn(x.shape, generator=gen).to(x.device)
    dfinal = torch.randn(init.shape, generator=gen).to(x.device, torch.bfloat16)
    ddA, want_ddA = torch.zeros_like(dA_cumsum), torch.zeros_like(dA_cumsum)
    dslot = torch.empty_like(dfinal, dtype=slot_dtype)
    dstates, dinit = state_passing.dstates_bwd(dy, C, states_in, dA_cumsum, ddA, dfinal, seq_idx, need_dinit=True,
                                               dfinal_scale=scale, dinit_out=dslot)
    want_dstates, want_dinit = state_passing.dstates_bwd(dy, C, states_in, dA_cumsum, want_ddA,
                                                         dfinal.float() * scale[:, None, None, None], seq_idx,
                                                         need_dinit=True)
    assert dinit is dslot and torch.equal(dstates, want_dstates) and torch.equal(ddA, want_ddA)
    assert_in_slot(dslot, want_dinit)
    with pytest.raises(AssertionError, match="scale: contiguous fp32"):
        state_passing.states_in_fwd(B, x, dt_out, dA_cumsum, incoming, seq_idx, init_scale=scale.double())


def test_state_passing_kernels_with_boundary_states_compile_for_an_h100():
    # the interpreter runs kernels as Python and misses what the compiler refuses (a path
    # returning int64 from one branch and int32 from the other once did); compiled here for
    # sm_90 without a GPU, in a process without TRITON_INTERPRET
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(root / "tests" / "compile_sm90.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("dtype, dstate_split", [(torch.float16, False), (torch.float32, False), (torch.float16, True)],
                         ids=["fp16", "fp32", "fp16_dstate_split"])
def test_shipped_settings_at_full_size_tiles(monkeypatch, dtype, dstate_split):
    # the other tests' small p, n and chunks cap every tile below the shipped settings' sizes;
    # here p = 64, n = 128 and chunk 256 let every stage run its shipped tiles: in fp16 as
    # shipped (the fused state passings step 128 tokens, dstate whole), in fp32 as capped for
    # 4-byte inputs (launch.WIDE_INPUT_CAPS; on a GPU, the check that they fit in shared memory).
    # The fused state passings against the two stages, and end to end against float64 (on CPU
    # dA and ddt_bias sum ddA over all 600 tokens in fp32: 1.7e-5 measured in fp32). The two
    # paths step their dots differently, so on a GPU (tf32) they agree to FP32_BOUND only.
    # dstate_split: the fused state passings with dstate in 16-wide tiles (launch.grid_dstate_block,
    # as a grid too small for the SMs takes them), eight programs a (batch, head) pair
    from kernels.triton_ssd import chunk_cumsum, chunk_scan, chunk_state, launch, state_passing
    monkeypatch.setattr(state_passing, "_fused_kernels_fill", lambda *_: True)   # on a GPU too (2 pairs)
    # Without it, dstate whole, as a one-GPU grid of 256 programs or more runs it (this one has 2)
    for name in launch.DSTATE_SPLIT_LAUNCHERS:
        split_below = 10**6 if dstate_split else 0
        monkeypatch.setitem(launch.SETTINGS, name, launch.SETTINGS[name] | {"grid_programs": split_below})
    whole = launch.dstate_block("chunk_state_passing_fwd", 128, dtype)
    assert launch.grid_dstate_block("chunk_state_passing_fwd", 128, 2, dtype) == (16 if dstate_split else whole)
    paths_bound = 1e-6 if DEVICE == "cpu" else FP32_BOUND
    inputs = make_inputs(1, 600, 2, 64, 1, 128, dtype=dtype, D="head", docs=2)
    x, dt, A, B, C, seq_idx, init = (inputs[k] for k in ("x", "dt", "A", "B", "C", "seq_idx", "initial_states"))
    dt_out, dA_cumsum = chunk_cumsum.chunk_cumsum_fwd(dt, A, 256, inputs["dt_bias"], True)
    states = chunk_state.chunk_state_fwd(B, x, dt_out, dA_cumsum, seq_idx)
    fwd_two_stages = state_passing.state_passing_fwd(states, dA_cumsum, x.shape[1], init, seq_idx)
    fwd_fused = state_passing.chunk_state_passing_fwd(B, x, dt_out, dA_cumsum, init, seq_idx)
    for name, ours, theirs in zip(("states_in", "final"), fwd_fused, fwd_two_stages):
        assert rel_err(ours, theirs) <= paths_bound, name
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(x.shape, generator=gen).to(x.device)
    d_final = torch.randn(init.shape, generator=gen).to(x.device)
    ddA_two, ddA_fused = torch.zeros_like(dA_cumsum), torch.zeros_like(dA_cumsum)
    states_in = fwd_two_stages[0]
    dstates_in = chunk_scan.chunk_scan_bwd_dstates(dy, C, dA_cumsum, seq_idx)
    bwd_two_stages = state_passing.state_passing_bwd(dstates_in, states_in, dA_cumsum, ddA_two, x.shape[1],
                                                     d_final, seq_idx, True)
    bwd_fused = state_passing.chunk_scan_state_passing_bwd(dy, C, states_in, dA_cumsum, ddA_fused, d_final,
                                                           seq_idx, True)
    for name, ours, theirs in zip(("dstates", "dinit", "ddA_cumsum"), (*bwd_fused, ddA_fused),
                                  (*bwd_two_stages, ddA_two)):
        assert rel_err(ours, theirs) <= paths_bound, name
    ours = run(ssd_triton, inputs, chunk_size=256)
    float64_bound = BF16_BOUND if dtype == torch.float16 else 1e-4 if DEVICE == "cpu" else FP32_BOUND
    check_all(ours, run(ssd_chunked, upcast(inputs), chunk_size=256), float64_bound, f"full-size tiles, {dtype}")


def test_chunked_triton_matches_sequential_recurrence():
    # the oracle itself, not only the chunked reference: documents, initial state, z, D
    inputs = make_inputs(1, 37, 2, 16, 1, 16, D="channel", docs=2)
    ours = run(ssd_triton, inputs, chunk_size=16)
    ref = run(ssd_sequential, upcast(inputs))
    check_all(ours, ref, FP32_BOUND, "sequential")


def test_document_boundaries_on_chunk_edges():
    # documents starting exactly at a chunk start, at the token after it, and at the chunk's last token
    inputs = make_inputs(1, 64, 2, 16, 1, 16, D="head", z=False)
    seq_idx = torch.zeros(1, 64, dtype=torch.int64)
    for start in (16, 17, 31, 48):
        seq_idx[:, start:] += 1
    inputs["seq_idx"] = seq_idx.to(DEVICE)
    ours = run(ssd_triton, inputs, chunk_size=16)
    ref = run(ssd_chunked, upcast(inputs), chunk_size=16)
    check_all(ours, ref, FP32_BOUND, "chunk edges")


def test_gradient_from_final_state_alone():
    # y unused: its gradient reaches backward as None
    inputs = make_inputs(1, 40, 2, 16, 1, 16, D=None, z=False)
    leaves = {k: (v.clone().requires_grad_(True) if k in ("x", "B", "dt", "initial_states") else v)
              for k, v in inputs.items()}
    _, final = ssd_triton(**leaves, chunk_size=16, return_final_states=True)
    final.sum().backward()
    ref_leaves = {k: (v.clone().requires_grad_(True) if k in ("x", "B", "dt", "initial_states") else v)
                  for k, v in upcast(inputs).items()}
    _, final_ref = ssd_chunked(**ref_leaves, chunk_size=16, return_final_states=True)
    final_ref.sum().backward()
    assert rel_err(final, final_ref) < FP32_BOUND
    for k in ("x", "B", "dt", "initial_states"):
        assert rel_err(leaves[k].grad, ref_leaves[k].grad) < FP32_BOUND, k


def test_non_contiguous_inputs():
    # transposed views of every tensor argument: the op must not assume the caller's layout
    inputs = make_inputs(1, 40, 4, 16, 2, 16, D="channel", docs=2)
    views = {k: (v.transpose(0, -1).contiguous().transpose(0, -1) if v is not None and v.dim() > 1
                 and v.is_floating_point() else v) for k, v in inputs.items()}
    assert not views["x"].is_contiguous() and not views["D"].is_contiguous()
    ours = run(ssd_triton, views, chunk_size=16)
    ref = run(ssd_chunked, upcast(inputs), chunk_size=16)
    check_all(ours, ref, FP32_BOUND, "non-contiguous")


def test_output_dtypes_follow_inputs():
    inputs = make_inputs(1, 20, 2, 16, 1, 16, dtype=torch.float16)
    y, final, grads = run(ssd_triton, inputs, chunk_size=16)
    assert y.dtype == torch.float16 and final.dtype == torch.float32
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name


# Triton 3.6's interpreter multiplies the raw bits of bf16 tl.dot operands (a 16x16 bf16 dot
# is off by 1e10), so bf16 runs compiled only: a gpu test here, and the real-shape gpu tests.
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=pytest.mark.gpu), torch.float16])
def test_half_precision_inputs_match_float64_reference(dtype):
    inputs = make_inputs(1, 45, 4, 16, 2, 16, dtype=dtype, D="channel", docs=2)
    ours = run(ssd_triton, inputs, chunk_size=16)
    ref = run(ssd_chunked, upcast(inputs), chunk_size=16)
    check_all(ours, ref, BF16_BOUND, str(dtype))


def test_rejects_mismatched_shapes():
    inputs = make_inputs(1, 16, 4, 16, 2, 16)
    inputs["B"] = inputs["B"][:, :, :1].expand(-1, -1, 3, -1)   # 3 groups do not divide 4 heads
    inputs["C"] = inputs["B"]
    with pytest.raises(ValueError, match="ngroups"):
        ssd_triton(**inputs, chunk_size=16)


# ----------------------------------------------------------------------------- GPU, real shapes

def _anchor():
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # noqa: BLE001 - any import failure means the anchor is not installed here
        return None
    return mamba_chunk_scan_combined


def _anchor_run(fn, inputs, chunk_size, **kwargs):
    # mamba_ssm wants seq_idx int32, and its dt_softplus defaults to False (ours to True)
    inputs = dict(inputs)
    if inputs["seq_idx"] is not None:
        inputs["seq_idx"] = inputs["seq_idx"].to(torch.int32)
    return run(lambda **kw: fn(chunk_size=chunk_size, dt_softplus=True, **kw, **kwargs), inputs)


GPU_CASES = {
    # b, l, h, p, g, n, chunk, options; the first is also compared with mamba_ssm (each other
    # shape would cost the anchor minutes of autotuning on the device)
    "b2_L2048_h32_p64_g1_n128_Q256": (2, 2048, 32, 64, 1, 128, 256, dict(D="head", z=False, anchor=True)),
    "b1_L4000_h16_p64_g2_n128_Q128_docs_init_z": (1, 4000, 16, 64, 2, 128, 128,
                                                   dict(D="channel", docs=5, dt_limit=(0.0, 0.5))),
    "b2_L1500_h8_p128_g8_n64_Q64": (2, 1500, 8, 128, 8, 64, 64, dict(D="head", z=True)),
    # 256 (batch, head) pairs: the fused state passings (state_passing.FUSED_MIN_PAIRS_PER_SM),
    # which the cases above (64 pairs at most) leave to the two stages
    "b8_L600_h32_p64_g1_n128_Q256_docs_init_z": (8, 600, 32, 64, 1, 128, 256, dict(D="head", docs=2)),
    # 128 pairs, a TP=2 rank of 1.3b: the fused state passings with dstate in two tiles
    # (launch.grid_dstate_block: 128 programs, below their grid_programs)
    "b4_L1000_h32_p64_g1_n128_Q256_docs": (4, 1000, 32, 64, 1, 128, 256, dict(D="head", docs=3)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_gpu_bf16_real_shapes_match_fp32_reference_and_mamba_ssm(case, capsys):
    b, l, h, p, g, n, chunk_size, opts = GPU_CASES[case]
    opts = dict(opts)
    kwargs = {k: opts.pop(k) for k in ("dt_limit",) if k in opts}
    with_anchor = opts.pop("anchor", False)
    inputs = make_inputs(b, l, h, p, g, n, dtype=torch.bfloat16, device="cuda", **opts)
    ours = run(ssd_triton, inputs, chunk_size=chunk_size, **kwargs)
    ref = run(ssd_chunked, upcast(inputs, torch.float32), chunk_size=chunk_size, **kwargs)
    errors = check_all(ours, ref, BF16_BOUND, case)
    line = f"{case} ours-vs-fp32 " + " ".join(f"{k}={v:.1e}" for k, v in errors.items())
    anchor = _anchor() if with_anchor else None
    if anchor is not None:
        theirs = _anchor_run(anchor, inputs, chunk_size, **kwargs)
        anchor_errors = check_all(theirs, ref, 5 * BF16_BOUND, case + " (mamba_ssm vs fp32)")
        line += "\n" + f"{case} mamba_ssm-vs-fp32 " + " ".join(f"{k}={v:.1e}" for k, v in anchor_errors.items())
        for name, err in errors.items():
            # ours is about as accurate as the anchor, up to bf16 noise
            assert err < 3 * anchor_errors[name] + 5e-3, f"{case}: {name} {err:.2e} vs mamba_ssm {anchor_errors[name]:.2e}"
    with capsys.disabled():
        print("\n" + line)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_size", [64, 128, 256])
def test_gpu_backward_per_tile_size_matches_fp32(chunk_size):
    # GPU.md: Triton 3.4-3.7.0 miscompiles some 64-wide transposed-dot backward kernels on Hopper;
    # check every gradient at each chunk size (each tile configuration) on the device
    inputs = make_inputs(2, 1024, 8, 64, 2, 128, dtype=torch.bfloat16, device="cuda", D="head", docs=3)
    ours = run(ssd_triton, inputs, chunk_size=chunk_size)
    ref = run(ssd_chunked, upcast(inputs, torch.float32), chunk_size=chunk_size)
    check_all(ours, ref, BF16_BOUND, f"Q={chunk_size}")
