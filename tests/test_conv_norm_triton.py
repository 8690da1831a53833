"""The Triton causal conv1d (`kernels.triton_conv`) and gated RMSNorm (`kernels.triton_norm`)
against the float64 torch references.

On a machine without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1)
at small shapes; with CUDA the same tests run compiled, and the `gpu` tests add real shapes
in bf16 against the fp32 reference. Every check is ‖ours − ref‖ / ‖ref‖ on the output, the
final state and each gradient, with the bound written beside it.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels.reference import add_rmsnorm, causal_conv1d, parts_gradient, rmsnorm_gated  # noqa: E402
from kernels.reference.norm import gathered_base  # noqa: E402
from kernels.triton_conv import causal_conv1d_triton  # noqa: E402
from kernels.triton_conv import conv1d as conv_stage  # noqa: E402
from kernels.triton_norm import add_rmsnorm_triton, rmsnorm_gated_triton  # noqa: E402
from triton_device import triton_device  # noqa: E402

DEVICE = triton_device(conv_stage._conv1d_fwd_kernel, "kernels.triton_conv")
# fp32 inputs, fp32 accumulation over a few hundred terms at most: measured about 2e-7
FP32_BOUND = 1e-5
# bf16/fp16 outputs and gradients are rounded once to 8 (11) mantissa bits: about 2e-3 (3e-4)
HALF_BOUND = 1e-2
CONV_GRADS = ("x", "weight", "bias", "initial_state")
NORM_GRADS = ("x", "z", "weight")


def rel_err(ours, ref):
    ref = ref.double()
    return ((ours.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_all(ours, ref, bound, what=""):
    """Compare dicts name -> tensor (outputs and gradients); assert each error is under `bound`."""
    assert set(ours) == set(ref), f"{what}: {sorted(ours)} != {sorted(ref)}"
    errors = {name: rel_err(ours[name], ref[name]) for name in ours}
    for name, err in errors.items():
        assert math.isfinite(err) and err < bound, (f"{what}: {name} relative error {err:.2e} >= {bound:.0e}; "
                                                    f"all: {errors}")
    return errors


def run(fn, inputs, grad_names, grad_dtype=torch.float32, **kwargs):
    """Outputs of fn and the gradients of <out, g_out> (+ <final, g_final>) for random g_*,
    drawn in `grad_dtype` so that ours and the reference see the same values."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in grad_names and v is not None else v)
              for k, v in inputs.items()}
    out = fn(**leaves, **kwargs)
    outs = dict(zip(("out", "final_state"), out)) if isinstance(out, tuple) else {"out": out}
    gen = torch.Generator().manual_seed(1)
    loss = 0
    for value in outs.values():
        loss = loss + (value.double() * torch.randn(value.shape, generator=gen).to(grad_dtype).to(value)).sum()
    loss.backward()
    return outs | {"d" + k: leaves[k].grad for k in grad_names if leaves.get(k) is not None}


def upcast(inputs, dtype=torch.float64):
    return {k: (v.to(dtype) if v is not None and v.is_floating_point() else v) for k, v in inputs.items()}


# ----------------------------------------------------------------------------- causal conv1d

def conv_inputs(b, l, d, width, *, dtype=torch.float32, device=DEVICE, bias=True, initial_state=True,
                doc_starts=None, first_doc=0, seed=0):
    """Random inputs; `doc_starts[row]` lists the tokens where a new document begins."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    inputs = dict(x=randn(b, l, d), weight=randn(d, width, scale=0.5), bias=randn(d) if bias else None,
                  initial_state=randn(b, width - 1, d) if initial_state else None, seq_idx=None)
    if doc_starts is not None:
        seq_idx = torch.full((b, l), first_doc, dtype=torch.int32)
        for row, starts in enumerate(doc_starts):
            for start in starts:
                seq_idx[row, start:] += 1
        inputs["seq_idx"] = seq_idx.to(device)
    return inputs


# Tiles the small_tiles fixture sets: forward 16 rows; backward tiles of 4 rows that each walk 5
# steps, so a backward program covers 20 rows in 4 stretches of 5 (kernels/triton_conv/conv1d.py)
FWD_TILE, BWD_ROWS, BWD_STEPS = 16, 4, 5


@pytest.fixture
def small_tiles(monkeypatch):
    # the short test sequences then span several forward tiles, several backward programs (the
    # last with stretches past the end) and stretches shorter than a program; dim 24 one full and
    # one partial channel block of 16
    for name, value in (("FWD_BLOCK_L", FWD_TILE), ("FWD_BLOCK_D", 16), ("BWD_BLOCK_L", BWD_ROWS),
                        ("BWD_BLOCK_D", 16), ("BWD_STEPS", BWD_STEPS)):
        monkeypatch.setattr(conv_stage, name, value)


def docs_across_tiles():
    # for seqlen 37: documents starting on a forward tile border (16, 32), a backward stretch
    # border (5, 10, 35) and program border (20), just before and after one (14, 11, 22), within
    # the first w-1 rows (2: the initial state's reach) and within the last w-1 rows (35, 36: the
    # final state's)
    program = BWD_ROWS * BWD_STEPS
    return [[2, BWD_STEPS, FWD_TILE, program, program + 2, 7 * BWD_STEPS],
            [2 * BWD_STEPS, 2 * BWD_STEPS + 1, 3 * BWD_STEPS - 1, 2 * FWD_TILE, 36]]


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("width", [2, 3, 4])
def test_conv_forward_and_every_gradient_match_float64_reference(width, activation):
    # bias, initial and final state, documents; seqlen 37: not a multiple of either tile
    inputs = conv_inputs(2, 37, 24, width, doc_starts=docs_across_tiles(), first_doc=5)
    kwargs = dict(activation=activation, return_final_state=True)
    ours = run(causal_conv1d_triton, inputs, CONV_GRADS, **kwargs)
    ref = run(causal_conv1d, upcast(inputs), CONV_GRADS, **kwargs)
    check_all(ours, ref, FP32_BOUND, f"width {width} {activation}")


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("width, activation", [(2, "silu"), (3, None), (4, "silu")])
def test_conv_without_bias_state_or_documents(width, activation):
    inputs = conv_inputs(2, 40, 24, width, bias=False, initial_state=False)
    ours = run(causal_conv1d_triton, inputs, CONV_GRADS, activation=activation)
    ref = run(causal_conv1d, upcast(inputs), CONV_GRADS, activation=activation)
    check_all(ours, ref, FP32_BOUND, f"width {width} {activation}")


@pytest.mark.parametrize("seqlen", [1, 2])
def test_conv_sequence_shorter_than_the_window(seqlen):
    # the final state then still holds initial_state rows, and their gradient flows back to it
    # (in row 1 at seqlen 2 not: the last token starts a new document)
    inputs = conv_inputs(2, seqlen, 24, 4, doc_starts=[[], [seqlen - 1]])
    ours = run(causal_conv1d_triton, inputs, CONV_GRADS, return_final_state=True)
    ref = run(causal_conv1d, upcast(inputs), CONV_GRADS, return_final_state=True)
    check_all(ours, ref, FP32_BOUND, f"seqlen {seqlen}")


@pytest.mark.usefixtures("small_tiles")
def test_conv_gradient_from_final_state_alone():
    # out unused: its gradient reaches backward as None; a document starts in the last w-1 rows
    inputs = conv_inputs(1, 20, 24, 4, doc_starts=[[18]])

    def final_only(**kw):
        return causal_conv1d_triton(**kw, return_final_state=True)[1]

    def final_only_ref(**kw):
        return causal_conv1d(**kw, return_final_state=True)[1]

    # weight and bias do not reach the final state: the reference has no gradient for them
    grads = ("x", "initial_state")
    check_all(run(final_only, inputs, grads), run(final_only_ref, upcast(inputs), grads), FP32_BOUND)


@pytest.mark.usefixtures("small_tiles")
def test_conv_backward_stretches_shorter_than_the_window(monkeypatch):
    # 2-row stretches at width 4: a stretch's w-1 rows of history and its last dx rows' dpre
    # reach over more than one neighbouring stretch
    monkeypatch.setattr(conv_stage, "BWD_BLOCK_L", 2)
    monkeypatch.setattr(conv_stage, "BWD_STEPS", 2)
    inputs = conv_inputs(2, 19, 16, 4, doc_starts=[[1, 4, 7, 8], [6, 17]], first_doc=2)
    ours = run(causal_conv1d_triton, inputs, CONV_GRADS, return_final_state=True)
    ref = run(causal_conv1d, upcast(inputs), CONV_GRADS, return_final_state=True)
    check_all(ours, ref, FP32_BOUND, "2-row stretches")


@pytest.mark.usefixtures("small_tiles")
def test_conv_backward_of_a_wide_conv_takes_the_wide_tiles(monkeypatch):
    # from BWD_WIDE_FROM channels on the backward walks 2-row tiles at 2 warps (conv1d.py); here
    # from 16 channels, 5 steps a stretch, so that 37 rows span several programs
    monkeypatch.setattr(conv_stage, "BWD_WIDE_FROM", 16)
    monkeypatch.setattr(conv_stage, "BWD_WIDE_STEPS", 5)
    launches = []
    kernel = conv_stage._conv1d_bwd_kernel

    class Recorded:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(conv_stage, "_conv1d_bwd_kernel", Recorded())
    inputs = conv_inputs(2, 37, 24, 4, doc_starts=docs_across_tiles(), first_doc=5)
    ours = run(causal_conv1d_triton, inputs, CONV_GRADS, return_final_state=True)
    ref = run(causal_conv1d, upcast(inputs), CONV_GRADS, return_final_state=True)
    check_all(ours, ref, FP32_BOUND, "wide tiles")
    assert [(k["BLOCK_L"], k["num_warps"], k["STEPS"]) for k in launches] == [(2, 2, 5)]
    launches.clear()
    monkeypatch.setattr(conv_stage, "BWD_WIDE_FROM", 25)   # 24 channels: the narrow tiles again
    run(causal_conv1d_triton, inputs, CONV_GRADS, return_final_state=True)
    assert [(k["BLOCK_L"], k["num_warps"], k["STEPS"]) for k in launches] == [(BWD_ROWS, 4, BWD_STEPS)]


@pytest.mark.usefixtures("small_tiles")
def test_conv_non_contiguous_inputs():
    # x a column slice of a wider tensor (the model's xBC is one of in_proj's outputs), the state
    # a transposed view of mamba_ssm's (batch, dim, width-1) layout
    inputs = conv_inputs(2, 30, 24, 4, doc_starts=[[7], [20]])
    wide = torch.randn(2, 30, 40, device=DEVICE)
    wide[..., 8:32] = inputs["x"]
    views = dict(inputs, x=wide[..., 8:32], initial_state=inputs["initial_state"].transpose(1, 2).contiguous()
                 .transpose(1, 2))
    assert not views["x"].is_contiguous() and not views["initial_state"].is_contiguous()
    ours = run(causal_conv1d_triton, views, CONV_GRADS, return_final_state=True)
    ref = run(causal_conv1d, upcast(inputs), CONV_GRADS, return_final_state=True)
    check_all(ours, ref, FP32_BOUND, "non-contiguous")


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv_half_precision_inputs(dtype):
    inputs = conv_inputs(1, 30, 24, 4, dtype=dtype, doc_starts=[[11]])
    ours = run(causal_conv1d_triton, inputs, CONV_GRADS, grad_dtype=dtype, return_final_state=True)
    for name in ("out", "final_state", "dx", "dweight", "dbias", "dinitial_state"):
        assert ours[name].dtype == dtype, name
    ref = run(causal_conv1d, upcast(inputs), CONV_GRADS, grad_dtype=dtype, return_final_state=True)
    check_all(ours, ref, HALF_BOUND, str(dtype))


def test_conv_default_tiles(monkeypatch):
    # the tile sizes the GPU runs: 32 x 128 forward tiles; backward tiles of 4 rows walking 64
    # steps (stretches of 64 rows, programs of 256), which a grid this small would otherwise
    # shorten (bwd_steps); documents start on stretch borders and off them
    monkeypatch.setattr(conv_stage, "BWD_GRID_WARPS", 0)
    inputs = conv_inputs(1, 260, 40, 4, doc_starts=[[32, 64, 100, 127, 128, 250]])
    ours = run(causal_conv1d_triton, inputs, CONV_GRADS, return_final_state=True)
    ref = run(causal_conv1d, upcast(inputs), CONV_GRADS, return_final_state=True)
    check_all(ours, ref, FP32_BOUND, "default tiles")


def test_conv_backward_walks_fewer_steps_on_a_small_grid():
    # the swept cases keep their steps (b4 L2048: 1.3b's x, wide tiles; a TP=2 rank's x), B|C's
    # two column tiles walk 16, a CP=2 rank's x at 1024 tokens a row half of 1.3b's, a CP=2
    # rank's 8192 tokens of a 16384-token row all of them
    wide, narrow = ((conv_stage.BWD_WIDE_BLOCK_L, 128, conv_stage.BWD_WIDE_WARPS, conv_stage.BWD_WIDE_STEPS),
                    (conv_stage.BWD_BLOCK_L, 128, conv_stage.BWD_WARPS, conv_stage.BWD_STEPS))
    steps = lambda b, l, d, tiles: conv_stage.bwd_steps(b, l, d, *tiles)
    assert steps(4, 2048, 4096, wide) == 128 and steps(4, 2048, 2048, narrow) == 64
    assert steps(4, 2048, 256, narrow) == 16
    assert steps(4, 1024, 4096, wide) == 64 and steps(1, 8192, 4096, wide) == 128


def test_conv_rejects_what_the_reference_rejects():
    inputs = conv_inputs(1, 8, 6, 4)
    with pytest.raises(ValueError, match=r"activation: expected 'silu' or None, found 'relu'"):
        causal_conv1d_triton(**inputs, activation="relu")
    with pytest.raises(ValueError, match=r"weight: expected shape \(6, width\).*found \(6, 5\)"):
        causal_conv1d_triton(**dict(inputs, weight=torch.zeros(6, 5, device=DEVICE)))


# ----------------------------------------------------------------------------- gated RMSNorm

def norm_inputs(shape, *, dtype=torch.float32, device=DEVICE, z=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    gate = torch.randn(shape, generator=gen).to(device=device, dtype=dtype) if z else None
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(device=device, dtype=dtype)
    return dict(x=x, z=gate, weight=weight)


# (shape, group_size): rows not a multiple of the row tile; on CPU, (3, 100, 16) spreads the
# backward over several programs, the last with rows past the end
NORM_CASES = {
    "groups_of_4": ((3, 7, 24), 4),
    "groups_of_12_not_power_of_two": ((3, 7, 24), 12),
    "one_group": ((3, 7, 24), None),
    "many_rows_two_groups": ((3, 100, 16), 8),
}


@pytest.mark.parametrize("with_z", [True, False], ids=["z", "no_z"])
@pytest.mark.parametrize("case", sorted(NORM_CASES))
def test_norm_forward_and_every_gradient_match_float64_reference(case, with_z):
    shape, group_size = NORM_CASES[case]
    inputs = norm_inputs(shape, z=with_z)
    ours = run(rmsnorm_gated_triton, inputs, NORM_GRADS, eps=1e-5, group_size=group_size)
    ref = run(rmsnorm_gated, upcast(inputs), NORM_GRADS, eps=1e-5, group_size=group_size)
    check_all(ours, ref, FP32_BOUND, case)


@pytest.mark.parametrize("case", ["groups_of_12_not_power_of_two", "many_rows_two_groups"])
def test_norm_backward_with_the_forwards_rstd_rewrites_its_output_bit_for_bit(case):
    # the mixer body's recompute path: backward reads the forward's 1/rms and writes the
    # forward's output again; the gradients match those that recompute the 1/rms
    from kernels.triton_norm.rmsnorm import rmsnorm_gated_bwd, rmsnorm_gated_fwd

    (b, l, d), group_size = NORM_CASES[case]
    inputs = norm_inputs((b, l, d), dtype=torch.bfloat16)
    x, z = (inputs[k].reshape(b * l, d) for k in ("x", "z"))
    rstd = torch.empty(d // group_size, b * l, device=DEVICE)
    out = rmsnorm_gated_fwd(x, z, inputs["weight"], 1e-5, group_size, rstd=rstd)
    dout = torch.randn_like(out)
    again = torch.empty_like(out)
    ours = rmsnorm_gated_bwd(dout, x, z, inputs["weight"], 1e-5, group_size, rstd=rstd, out=again)
    assert torch.equal(again, out)
    recomputed = rmsnorm_gated_bwd(dout, x, z, inputs["weight"], 1e-5, group_size)
    for mine, theirs in zip(ours, recomputed):
        torch.testing.assert_close(mine, theirs, rtol=1e-2, atol=1e-2)   # bf16 outputs: 1/rms may differ in its last bit
    with pytest.raises(AssertionError, match="needs the forward's rstd"):
        rmsnorm_gated_bwd(dout, x, z, inputs["weight"], 1e-5, group_size, out=again)


def test_norm_non_contiguous_gate():
    # z a column slice of a wider tensor, as the model's z is of in_proj's output
    inputs = norm_inputs((2, 9, 24))
    wide = torch.randn(2, 9, 64, device=DEVICE)
    wide[..., 16:40] = inputs["z"]
    ours = run(rmsnorm_gated_triton, dict(inputs, z=wide[..., 16:40]), NORM_GRADS, group_size=8)
    ref = run(rmsnorm_gated, upcast(inputs), NORM_GRADS, group_size=8)
    check_all(ours, ref, FP32_BOUND, "non-contiguous z")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_half_precision_inputs(dtype):
    inputs = norm_inputs((4, 9, 32), dtype=dtype)
    ours = run(rmsnorm_gated_triton, inputs, NORM_GRADS, grad_dtype=dtype, group_size=16)
    for name in ("out", "dx", "dz", "dweight"):
        assert ours[name].dtype == dtype, name
    ref = run(rmsnorm_gated, upcast(inputs), NORM_GRADS, grad_dtype=dtype, group_size=16)
    check_all(ours, ref, HALF_BOUND, str(dtype))


def test_norm_rejects_what_the_reference_rejects():
    inputs = norm_inputs((2, 8))
    with pytest.raises(ValueError, match=r"group_size: expected a positive divisor of x's last dim 8.*found 3"):
        rmsnorm_gated_triton(**inputs, group_size=3)
    with pytest.raises(ValueError, match=r"weight: expected shape \(8,\).*found \(4,\)"):
        rmsnorm_gated_triton(**dict(inputs, weight=inputs["weight"][:4]))


# ----------------------------------------------------------------------------- residual add + RMSNorm

def add_norm_inputs(shape, *, update_dtype=torch.float32, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    residual = torch.randn(shape, generator=gen).to(device=device)
    update = torch.randn(shape, generator=gen).to(device=device, dtype=update_dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(device=device)
    return dict(residual=residual, update=update, weight=weight)


def run_add_norm(fn, inputs, uses=("total", "out"), **kwargs):
    """Both outputs of fn and the gradients of the sum of <output, g> over the outputs `uses`
    names: both in every block but the last, whose sum nothing else reads."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    outputs = dict(zip(("total", "out"), fn(**leaves, **kwargs)))
    gen = torch.Generator().manual_seed(1)
    loss = sum((outputs[name].double() * torch.randn(outputs[name].shape, generator=gen).to(outputs[name])).sum()
               for name in uses)
    loss.backward()
    return outputs | {"d" + k: leaves[k].grad for k in inputs}


@pytest.mark.parametrize("uses", [("total", "out"), ("out",), ("total",)], ids=["both", "last_norm", "sum_only"])
@pytest.mark.parametrize("shape", [(3, 7, 24), (3, 100, 16)], ids=["few_rows", "several_programs"])
def test_add_norm_forward_and_every_gradient_match_float64_reference(shape, uses):
    inputs = add_norm_inputs(shape)
    ours = run_add_norm(add_rmsnorm_triton, inputs, uses, eps=1e-5)
    ref = run_add_norm(add_rmsnorm, upcast(inputs), uses, eps=1e-5)
    if uses == ("total",):   # no gradient reaches the weight: autograd leaves it None, ours zero
        assert ref.pop("dweight") is None and not ours.pop("dweight").any()
    check_all(ours, ref, FP32_BOUND, f"{shape} uses={uses}")


@pytest.mark.parametrize("update_dtype", [torch.float32, torch.bfloat16])
def test_add_norm_leaves_accumulate_their_own_gradients(update_dtype):
    # with one dtype the backward hands both inputs one gradient tensor: as leaves, each
    # .grad must still be its own, so that a second backward adds into each once
    inputs = add_norm_inputs((2, 9, 16), update_dtype=update_dtype)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    ref = {k: v.double().requires_grad_(True) for k, v in inputs.items()}
    for _ in range(2):
        for fn, args in ((add_rmsnorm_triton, leaves), (add_rmsnorm, ref)):
            total, out = fn(**args, eps=1e-5)
            (total.double().sum() + (out.double() ** 2).sum()).backward()
    assert leaves["residual"].grad.data_ptr() != leaves["update"].grad.data_ptr()
    bound = FP32_BOUND if update_dtype == torch.float32 else HALF_BOUND
    for name in leaves:
        check_all({"d" + name: leaves[name].grad}, {"d" + name: ref[name].grad}, bound, name)


def test_add_norm_is_the_add_then_the_norm_bit_for_bit():
    # the model's case: fp32 stream, bf16 mixer output, bf16 norm output. Fused, the same fp32
    # math as the add then the Triton norm: the same bits out, and the same gradients (the
    # norm's input gradient plus the sum's, written in the residual's dtype and the update's)
    inputs = add_norm_inputs((4, 33, 32), update_dtype=torch.bfloat16)

    def unfused(residual, update, weight, eps, out_dtype):
        total = residual + update
        return total, rmsnorm_gated_triton(total, None, weight, eps, out_dtype=out_dtype)

    fused = run_add_norm(add_rmsnorm_triton, inputs, eps=1e-5, out_dtype=torch.bfloat16)
    apart = run_add_norm(unfused, inputs, eps=1e-5, out_dtype=torch.bfloat16)
    assert (fused["out"].dtype, fused["dresidual"].dtype, fused["dupdate"].dtype) == \
        (torch.bfloat16, torch.float32, torch.bfloat16)
    for name in ("total", "out", "dresidual", "dweight"):
        assert torch.equal(fused[name], apart[name]), name
    # the update's gradient is the residual's cast to bf16: torch and a GPU round to nearest,
    # Triton's interpreter truncates
    expected = apart["dresidual"]
    if DEVICE == "cpu":
        expected = (expected.view(torch.int32) & ~0xFFFF).view(torch.float32)
    assert torch.equal(fused["dupdate"], expected.to(torch.bfloat16))


@pytest.mark.parametrize("update_dtype", [torch.float32, torch.bfloat16])
def test_add_norm_sums_an_update_given_as_partial_sums(update_dtype):
    # tensor parallelism's out_proj terms, one a rank, joined with the stream at the norm: the
    # float64 reference's sum, and each part's gradient the sum's (one tensor, stride 0)
    shape, parts = (3, 20, 16), 2
    inputs = add_norm_inputs(shape, update_dtype=update_dtype)
    inputs["update"] = torch.stack([inputs["update"], torch.randn(shape).to(inputs["update"])])
    ours = run_add_norm(add_rmsnorm_triton, inputs, eps=1e-5)
    ref = run_add_norm(add_rmsnorm, upcast(inputs), eps=1e-5)
    assert ours["dupdate"].shape == (parts, *shape) and ours["total"].dtype == torch.float32
    check_all(ours, ref, FP32_BOUND if update_dtype == torch.float32 else HALF_BOUND, str(update_dtype))
    # what the producer of the parts receives (a leaf's .grad would be a copy), from either
    # implementation: one tensor in the parts' dtype (mixer_body's backward reads it so)
    for fn in (add_rmsnorm_triton, add_rmsnorm):
        seen = []
        update = inputs["update"].clone().requires_grad_(True) * 1
        update.register_hook(seen.append)
        fn(inputs["residual"], update, inputs["weight"])[1].float().sum().backward()
        assert seen[0].stride(0) == 0 and seen[0].shape == (parts, *shape) and seen[0].dtype == update_dtype, fn
        parts_gradient(seen[0])


@pytest.mark.parametrize("uses", [("total", "out"), ("out",)], ids=["block", "last_norm"])
@pytest.mark.parametrize("update_parts", [1, 3])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_add_norm_sums_its_outputs_gradient_given_as_terms(out_dtype, update_parts, uses):
    # under tp_comm_overlap in_proj's backward gives the norm's output gradient as each rank's
    # term (out_parts): the output is seen once a term (stride 0), and the backward kernel sums
    # the terms as it reads them, as the reference's expand sums them; with the update given as
    # terms too (the model's case), and with nothing else reading the sum (dtotal None)
    shape, parts = (3, 20, 16), 3
    inputs = add_norm_inputs(shape, update_dtype=out_dtype)   # bf16 as under autocast
    if update_parts > 1:
        inputs["update"] = torch.stack([inputs["update"]] + [torch.randn(shape).to(inputs["update"])
                                                             for _ in range(update_parts - 1)])
    ours = run_add_norm(add_rmsnorm_triton, inputs, uses, eps=1e-5, out_dtype=out_dtype, out_parts=parts)
    ref = run_add_norm(add_rmsnorm, upcast(inputs), uses, eps=1e-5, out_parts=parts)
    assert ours["out"].shape == (parts, *shape) and ours["out"].stride(0) == 0 and ours["out"].dtype == out_dtype
    check_all(ours, ref, FP32_BOUND if out_dtype == torch.float32 else HALF_BOUND, str(out_dtype))


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_add_norm_writes_into_a_rank_s_rows_of_a_gathered_tensor(impl):
    # gather_rank: the norm (and, Triton, the update's gradient) lands in rank 1's rows of a
    # tensor twice as tall, where the all-gather after it finds them; the values unchanged
    fn = add_rmsnorm_triton if impl == "triton" else add_rmsnorm
    shape, parts, rank = (3, 20, 16), 2, 1
    inputs = add_norm_inputs(shape, update_dtype=torch.bfloat16)
    inputs["update"] = torch.stack([inputs["update"], torch.randn(shape).to(inputs["update"])])
    plain = run_add_norm(fn, inputs, eps=1e-5, out_dtype=torch.bfloat16, out_parts=parts)
    seen = []
    placed = run_add_norm(lambda **kw: _record_update_grad(fn, seen, **kw), inputs, eps=1e-5,
                          out_dtype=torch.bfloat16, out_parts=parts, gather_rank=rank)
    for name, value in plain.items():
        assert torch.equal(placed[name], value), name
    rows = placed["out"][0]
    assert gathered_base(rows, parts, rank) is rows._base and rows._base.shape == (parts * shape[0], *shape[1:])
    assert gathered_base(plain["out"][0], parts, rank) is None   # a tensor of its own
    # a view of the right height that gathered_rows did not make is not gathered into
    assert gathered_base(torch.empty(parts * shape[0], *shape[1:]).chunk(parts)[rank], parts, rank) is None
    if impl == "triton":   # the update's gradient, as mixer_body's backward reads it
        got = parts_gradient(seen[0])
        assert gathered_base(got, parts, rank) is not None
    with pytest.raises(ValueError, match="gather_rank: expected a rank below out_parts=2"):
        fn(inputs["residual"], inputs["update"], inputs["weight"], out_parts=parts, gather_rank=2)


def _record_update_grad(fn, seen, residual, update, weight, **kwargs):
    # fn with the gradient reaching `update` recorded as it arrives (before any accumulation)
    update = update * 1
    update.register_hook(seen.append)
    return fn(residual, update, weight, **kwargs)


def test_add_norm_rejects_mismatched_shapes():
    inputs = add_norm_inputs((2, 8))
    with pytest.raises(ValueError, match=r"update: expected shape \(2, 8\)"):
        add_rmsnorm_triton(**dict(inputs, update=inputs["update"][:1]))
    with pytest.raises(ValueError, match=r"weight: expected shape \(8,\)"):
        add_rmsnorm_triton(**dict(inputs, weight=inputs["weight"][:4]))
    with pytest.raises(ValueError, match="out_parts: expected a positive count"):
        add_rmsnorm_triton(**inputs, out_parts=0)


@pytest.mark.parametrize("rows, shape, transposed, dtype",
                         [(1, (5,), False, torch.float32), (37, (300,), False, torch.bfloat16),
                          (513, (4, 70), True, torch.float32), (6, (3, 2), True, torch.float16)])
def test_column_sum_of_partials_into_any_layout_and_dtype(rows, shape, transposed, dtype):
    # the backward kernels' partial rows of dweight and dbias summed into the weight's dtype
    # and layout (the conv's (d, width) weight from (width, d) partials: a transposed output)
    from kernels.column_sum import column_sum
    parts = torch.randn(rows, *shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    out = torch.empty(shape[::-1] if transposed else shape, device=DEVICE, dtype=dtype)
    result = column_sum(parts, out.t() if transposed else out)
    expected = parts.double().sum(0)
    assert result.dtype == dtype and rel_err(result, expected) <= (FP32_BOUND if dtype == torch.float32 else HALF_BOUND)
    assert torch.equal(out.t() if transposed else out, result)


# ----------------------------------------------------------------------------- GPU, real shapes

@pytest.mark.gpu
def test_gpu_dispatch_runs_triton_on_cuda_tensors():
    inputs = conv_inputs(1, 64, 32, 4, device="cuda")
    assert torch.equal(kernels.causal_conv1d(**inputs), causal_conv1d_triton(**inputs))
    norm = norm_inputs((64, 32), device="cuda")
    assert torch.equal(kernels.rmsnorm_gated(**norm), rmsnorm_gated_triton(**norm))
    add_norm = add_norm_inputs((64, 32), update_dtype=torch.bfloat16, device="cuda")
    for ours, triton_op in zip(kernels.add_rmsnorm(**add_norm), add_rmsnorm_triton(**add_norm)):
        assert torch.equal(ours, triton_op)


@pytest.mark.gpu
def test_gpu_conv_bf16_real_shape_matches_fp32_reference(capsys):
    # the conv of a d_model 2048 layer (d_inner 4096 + 2 · 128 for B, C), packed documents,
    # carried state in and out
    b, l, d = 8, 2048, 4096 + 2 * 128
    starts = [sorted(torch.randint(1, l, (4,), generator=torch.Generator().manual_seed(r)).tolist())
              for r in range(b)]
    inputs = conv_inputs(b, l, d, 4, dtype=torch.bfloat16, device="cuda", doc_starts=starts)
    kwargs = dict(grad_dtype=torch.bfloat16, return_final_state=True)
    ours = run(causal_conv1d_triton, inputs, CONV_GRADS, **kwargs)
    ref = run(causal_conv1d, upcast(inputs, torch.float32), CONV_GRADS, **kwargs)
    errors = check_all(ours, ref, HALF_BOUND, "conv")
    with capsys.disabled():
        print(f"\nconv b{b} L{l} d{d} bf16 vs fp32: " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))


@pytest.mark.gpu
@pytest.mark.parametrize("group_size", [4096, 512])
def test_gpu_norm_bf16_real_shape_matches_fp32_reference(group_size, capsys):
    inputs = norm_inputs((8, 2048, 4096), dtype=torch.bfloat16, device="cuda")
    ours = run(rmsnorm_gated_triton, inputs, NORM_GRADS, grad_dtype=torch.bfloat16, group_size=group_size)
    ref = run(rmsnorm_gated, upcast(inputs, torch.float32), NORM_GRADS, grad_dtype=torch.bfloat16,
              group_size=group_size)
    errors = check_all(ours, ref, HALF_BOUND, f"norm group {group_size}")
    with capsys.disabled():
        print(f"\nnorm 8x2048x4096 group {group_size} bf16 vs fp32: "
              + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
