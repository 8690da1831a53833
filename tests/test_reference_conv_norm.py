"""The causal depthwise conv1d and the gated grouped RMSNorm references (float64, CPU)."""

import pytest
import torch
import torch.nn.functional as F

from kernels.reference import causal_conv1d, rmsnorm_gated

TOL = 1e-12


def assert_rel_close(actual, expected, name, tol=TOL):
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


def conv_inputs(b=2, l=17, d=6, w=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(d, w, generator=gen, dtype=torch.float64)
    bias = torch.randn(d, generator=gen, dtype=torch.float64)
    initial_state = torch.randn(b, w - 1, d, generator=gen, dtype=torch.float64)
    return x, weight, bias, initial_state


def torch_conv(x, weight, bias, activation):
    # the layout of mamba_ssm: weight is Conv1d(groups=d).weight.squeeze(1)
    l, w = x.shape[1], weight.shape[1]
    out = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=w - 1, groups=x.shape[2])
    out = out[..., :l].transpose(1, 2)
    return F.silu(out) if activation == "silu" else out


# ----------------------------------------------------------------------------- causal_conv1d

@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("width", [2, 3, 4])
def test_causal_conv1d_matches_torch_conv1d(width, activation, with_bias):
    x, weight, bias, _ = conv_inputs(w=width)
    bias = bias if with_bias else None
    out = causal_conv1d(x, weight, bias, activation=activation)
    assert_rel_close(out, torch_conv(x, weight, bias, activation), "out")


@pytest.mark.parametrize("width", [2, 4])
def test_causal_conv1d_seq_idx_resets_between_documents(width):
    l, split = 17, 6
    x, weight, bias, initial_state = conv_inputs(w=width)
    seq_idx = torch.zeros(2, l, dtype=torch.int64)
    seq_idx[:, split:] = 1
    packed = causal_conv1d(x, weight, bias, initial_state=initial_state, seq_idx=seq_idx)
    # the initial state continues the first document; the second starts from empty history
    first = causal_conv1d(x[:, :split], weight, bias, initial_state=initial_state)
    second = causal_conv1d(x[:, split:], weight, bias)
    assert_rel_close(packed, torch.cat([first, second], dim=1), "packed out")


@pytest.mark.parametrize("width", [2, 3, 4])
def test_causal_conv1d_final_state_carries_into_next_segment(width):
    split = 9
    x, weight, bias, initial_state = conv_inputs(w=width)
    whole, whole_final = causal_conv1d(x, weight, bias, initial_state=initial_state,
                                       return_final_state=True)
    first, carried = causal_conv1d(x[:, :split], weight, bias, initial_state=initial_state,
                                   return_final_state=True)
    second, final = causal_conv1d(x[:, split:], weight, bias, initial_state=carried,
                                  return_final_state=True)
    assert_rel_close(torch.cat([first, second], dim=1), whole, "out")
    assert torch.equal(final, whole_final)
    assert torch.equal(whole_final, x[:, -(width - 1):])   # raw inputs, before activation


@pytest.mark.parametrize("seqlen", [1, 2])
def test_causal_conv1d_final_state_when_shorter_than_window(seqlen):
    x, weight, bias, initial_state = conv_inputs(l=seqlen, w=4)
    out, final = causal_conv1d(x, weight, bias, initial_state=initial_state, return_final_state=True)
    assert final.shape == (2, 3, 6)
    assert torch.equal(final, torch.cat([initial_state, x], dim=1)[:, -3:])
    # and the output still reads the carried rows: equal to convolving [initial_state; x]
    full = torch_conv(torch.cat([initial_state, x], dim=1), weight, bias, "silu")[:, -seqlen:]
    assert_rel_close(out, full, "out")


def test_causal_conv1d_rejects_unknown_activation():
    x, weight, bias, _ = conv_inputs()
    with pytest.raises(ValueError, match=r"activation: expected 'silu' or None, found 'relu'"):
        causal_conv1d(x, weight, bias, activation="relu")


def test_causal_conv1d_rejects_bad_weight_shape():
    x, _, bias, _ = conv_inputs()
    with pytest.raises(ValueError, match=r"weight: expected shape \(6, width\).*found \(6, 5\)"):
        causal_conv1d(x, torch.randn(6, 5, dtype=torch.float64), bias)


# ----------------------------------------------------------------------------- rmsnorm_gated

def norm_inputs(shape=(2, 5, 8), seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    z = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)).to(dtype)
    return x, z, weight


def rmsnorm_formula(v, weight, eps, group_size):
    # explicit loop over groups: v[..., group] / sqrt(mean(v[..., group]^2) + eps) * weight[group]
    parts = []
    for start in range(0, v.shape[-1], group_size):
        chunk = v[..., start:start + group_size]
        parts.append(chunk / torch.sqrt((chunk * chunk).mean(-1, keepdim=True) + eps))
    return torch.cat(parts, dim=-1) * weight


@pytest.mark.parametrize("group_size", [None, 4, 2])
def test_rmsnorm_gated_matches_formula(group_size):
    x, z, weight = norm_inputs()
    out = rmsnorm_gated(x, z, weight, eps=1e-5, group_size=group_size)
    gated = x * z * torch.sigmoid(z)
    expected = rmsnorm_formula(gated, weight, 1e-5, group_size or x.shape[-1])
    assert_rel_close(out, expected, "out")


def test_rmsnorm_gated_without_gate_is_rmsnorm():
    x, _, weight = norm_inputs()
    assert_rel_close(rmsnorm_gated(x, None, weight), rmsnorm_formula(x, weight, 1e-5, 8), "out")


def test_rmsnorm_gated_gates_before_the_norm():
    x, z, weight = norm_inputs()
    out = rmsnorm_gated(x, z, weight)
    norm_then_gate = rmsnorm_formula(x, weight, 1e-5, 8) * F.silu(z)
    assert (out - norm_then_gate).abs().max() > 1e-2


def test_rmsnorm_gated_statistics_in_float32_for_bf16():
    # values whose squares do not sum exactly in bf16 (8 bits of mantissa)
    x, z, weight = norm_inputs(shape=(4, 64), dtype=torch.bfloat16)
    x = x + 3
    out = rmsnorm_gated(x, z, weight, group_size=32)
    assert out.dtype == torch.bfloat16
    expected = rmsnorm_formula(x.float() * F.silu(z.float()), weight.float(), 1e-5, 32)
    # within one bf16 rounding of the float32 result
    assert ((out.float() - expected).abs() <= expected.abs() * 2 ** -8 + 1e-6).all()
    # while statistics in bf16 would be visibly off somewhere
    gated16 = x * F.silu(z)
    bf16_stats = rmsnorm_formula(gated16, weight, 1e-5, 32).float()
    assert ((bf16_stats - expected).abs() > expected.abs() * 2 ** -8).any()


def test_rmsnorm_gated_matches_transformers_in_float32():
    mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    x, z, weight = (t.float() for t in norm_inputs(shape=(2, 5, 8)))
    norm = mamba2.MambaRMSNormGated(8, group_size=4, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(weight)
        expected = norm(x, z)
    assert_rel_close(rmsnorm_gated(x, z, weight, eps=1e-5, group_size=4), expected, "out", tol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(group_size=3), r"group_size: expected a positive divisor of x's last dim 8.*\(2, 5, 8\).*found 3"),
    (dict(z=torch.zeros(2, 5, 4)), r"z: expected shape \(2, 5, 8\).*found \(2, 5, 4\)"),
    (dict(weight=torch.ones(4)), r"weight: expected shape \(8,\).*found \(4,\)"),
], ids=["group_size", "z", "weight"])
def test_rmsnorm_gated_rejects_bad_shapes(kwargs, match):
    x, z, weight = norm_inputs()
    args = dict(z=z, weight=weight) | kwargs
    with pytest.raises(ValueError, match=match):
        rmsnorm_gated(x, **args)


def test_conv_final_state_holds_only_the_last_document():
    # a document starting inside the last w-1 rows: the state must not carry the earlier
    # document into the next window (which continues the last one)
    torch.manual_seed(0)
    x, weight = torch.randn(1, 10, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 8 + [1] * 2])
    _, state = causal_conv1d(x, weight, seq_idx=seq_idx, return_final_state=True)
    assert torch.equal(state[0, 0], torch.zeros(3, dtype=torch.float64))  # row 7: document 0
    assert torch.equal(state[0, 1:], x[0, 8:])
    # carrying it on equals running the last document's continuation in one piece
    more = torch.randn(1, 5, 3, dtype=torch.float64)
    whole = causal_conv1d(torch.cat([x, more], 1), weight, seq_idx=torch.tensor([[0] * 8 + [1] * 7]))
    carried = causal_conv1d(more, weight, initial_state=state, seq_idx=torch.ones(1, 5, dtype=torch.long))
    torch.testing.assert_close(carried, whole[:, 10:], rtol=0, atol=1e-12)


def test_rmsnorm_gated_writes_the_requested_dtype():
    # the block norm writes the autocast dtype straight away: the same values, rounded once
    gen = torch.Generator().manual_seed(0)
    x, z = torch.randn(3, 5, 16, generator=gen), torch.randn(3, 5, 16, generator=gen)
    weight = 1 + 0.1 * torch.randn(16, generator=gen)
    out = rmsnorm_gated(x, z, weight, group_size=8, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, rmsnorm_gated(x, z, weight, group_size=8).to(torch.bfloat16))
