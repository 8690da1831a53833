"""The mixer body as one op (`kernels.mixer_body`: conv, SSD, gated norm, out_proj) against the
float64 reference chain, what it keeps for backward, and the model's two paths agreeing.

On a machine without CUDA the Triton Function runs under Triton's interpreter at small shapes;
with CUDA the same tests run compiled and the `gpu` test adds a real shape in bf16.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from kernels import reference  # noqa: E402
from kernels.triton_mixer import mixer_body_triton  # noqa: E402
from kernels.triton_ssd import chunk_cumsum as _stage  # noqa: E402
from mamba_train.config import ModelConfig  # noqa: E402
from mamba_train.model import Mamba2Mixer  # noqa: E402
from triton_device import triton_device  # noqa: E402

DEVICE = triton_device(_stage._chunk_cumsum_fwd_kernel, "kernels.triton_ssd")
# fp32 inputs through conv, SSD, norm and a matmul, each measured near 1e-7 under the
# interpreter; a GPU runs fp32 dots in tf32: on an H100 the case with documents and dt_limit
# measured up to 9.7e-3 (ddt_bias, a sum of cancelling terms over every token)
FP32_BOUND = 1e-5 if DEVICE == "cpu" else 2e-2
BF16_BOUND = 2e-2
GRADS = ("zxbcdt", "conv_weight", "conv_bias", "dt_bias", "A", "D", "norm_weight", "out_weight")


def make_inputs(b, l, h, p, g, n, d_model, *, width=4, D="head", docs=0, dtype=torch.float32, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    d_inner, conv_dim = h * p, h * p + 2 * g * n
    zxbcdt = randn(b, l, d_inner + conv_dim + h)
    zxbcdt[..., -h:] = zxbcdt[..., -h:] * 0.5 - 1.0   # dt before softplus, in a layer's range
    inputs = dict(
        zxbcdt=zxbcdt, conv_weight=randn(conv_dim, width, scale=0.5), conv_bias=randn(conv_dim, scale=0.1),
        dt_bias=randn(h, scale=0.5), A=-(torch.rand(h, generator=gen) * 3 + 0.2).to(device=device, dtype=dtype),
        D={"head": randn(h), "channel": randn(h, p)}[D], norm_weight=1 + randn(d_inner, scale=0.1),
        out_weight=randn(d_model, d_inner, scale=d_inner ** -0.5), seq_idx=None)
    if docs:
        seq_idx = torch.zeros(b, l, dtype=torch.int32)
        for row in range(b):
            for start in torch.randint(1, l, (docs,), generator=gen).tolist():
                seq_idx[row, start:] += 1
        inputs["seq_idx"] = seq_idx.to(device)
    return inputs


def run(fn, inputs, **kwargs):
    """The output and the gradients of <out, g> for a random g."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in GRADS else v) for k, v in inputs.items()}
    out = fn(**leaves, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    (out.double() * g.double()).sum().backward()
    return {"out": out} | {"d" + k: leaves[k].grad for k in GRADS}


def upcast(inputs, dtype=torch.float64):
    return {k: (v.to(dtype) if v is not None and v.is_floating_point() else v) for k, v in inputs.items()}


def rel_err(ours, ref):
    ref = ref.double()
    return ((ours.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_all(ours, ref, bound, what):
    errors = {name: rel_err(ours[name], ref[name]) for name in ref}
    for name, err in errors.items():
        assert math.isfinite(err) and err < bound, f"{what}: {name} relative error {err:.2e} >= {bound:.0e}; {errors}"
    return errors


# (b, l, h, p, g, n, d_model, chunk_size, options)
CASES = {
    "g2_channel_D_docs_dt_limit": (2, 45, 4, 8, 2, 8, 24, 16, dict(D="channel", docs=3), dict(dt_limit=(0.05, 2.0))),
    "g1_head_D_width2": (1, 33, 2, 16, 1, 16, 16, 16, dict(D="head", width=2), {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mixer_body_matches_float64_reference(case):
    b, l, h, p, g, n, d_model, chunk, options, kwargs = CASES[case]
    inputs = make_inputs(b, l, h, p, g, n, d_model, **options)
    ours = run(mixer_body_triton, inputs, ngroups=g, chunk_size=chunk, norm_eps=1e-5, **kwargs)
    ref = run(reference.mixer_body, upcast(inputs), ngroups=g, chunk_size=chunk, norm_eps=1e-5, **kwargs)
    check_all(ours, ref, FP32_BOUND, case)


def _saved_activation_bytes(fn, inputs, **kwargs):
    """Bytes autograd keeps for backward of tensors other than the given inputs (activations)."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in GRADS else v) for k, v in inputs.items()}
    given = {t.data_ptr() for t in leaves.values() if t is not None} - {leaves["zxbcdt"].data_ptr()}
    kept = {}

    def pack(t):
        if t.data_ptr() not in given:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(**leaves, **kwargs)
    return sum(kept.values())


def _chained_triton_ops(monkeypatch):
    """The reference chain (kernels.reference.mixer_body) with the Triton ops in place of the
    reference ops: the mixer body op by op, each op its own autograd Function."""
    from kernels.triton_conv import causal_conv1d_triton
    from kernels.triton_norm import rmsnorm_gated_triton
    from kernels.triton_ssd import ssd_triton

    monkeypatch.setattr(reference.mixer, "causal_conv1d", causal_conv1d_triton)
    monkeypatch.setattr(reference.mixer, "ssd_chunked", ssd_triton)
    monkeypatch.setattr(reference.mixer, "rmsnorm_gated", rmsnorm_gated_triton)
    return reference.mixer_body


def test_keeps_only_in_proj_output_y_chunk_states_and_norm_rstd_for_backward(monkeypatch):
    b, l, h, p, g, n, d_model, chunk = 2, 40, 4, 8, 1, 16, 24, 16
    inputs = make_inputs(b, l, h, p, g, n, d_model)
    kwargs = dict(ngroups=g, chunk_size=chunk, norm_eps=1e-5)
    token_bytes = 4 * b * l
    zxbcdt_bytes, y_bytes = inputs["zxbcdt"].numel() * 4, token_bytes * h * p
    states_bytes = 4 * b * math.ceil(l / chunk) * h * p * n   # the state entering each chunk
    states_bytes += token_bytes * g   # and the gated norm's 1/rms, fp32 per row and group
    assert _saved_activation_bytes(mixer_body_triton, inputs, **kwargs) == zxbcdt_bytes + y_bytes + states_bytes
    # the chained ops also keep the conv's output (x copied for the SSD, B, C) and the norm's
    # output (out_proj's input), and a copy of dt
    chained = _saved_activation_bytes(_chained_triton_ops(monkeypatch), inputs, **kwargs)
    assert chained >= zxbcdt_bytes + y_bytes + states_bytes + token_bytes * (h * p + 2 * g * n) + token_bytes * h * p


def test_keep_activations_keeps_conv_and_norm_outputs_and_changes_no_result():
    # train.recompute="none": backward reads the conv's output (x, B, C) and the gated norm's
    # output kept from forward instead of recomputing them: the same kernels on the same inputs,
    # so every output and gradient is bit for bit the same (on a GPU the backward's atomic sums
    # add in any order: there two runs of either mode differ in the last bits)
    b, l, h, p, g, n, d_model, chunk, options, kwargs = CASES["g2_channel_D_docs_dt_limit"]
    inputs = make_inputs(b, l, h, p, g, n, d_model, **options)
    kwargs = kwargs | dict(ngroups=g, chunk_size=chunk, norm_eps=1e-5)
    recomputed = run(mixer_body_triton, inputs, **kwargs)
    kept = run(mixer_body_triton, inputs, keep_activations=True, **kwargs)
    for name, value in recomputed.items():
        if DEVICE == "cpu" or name == "out":
            assert torch.equal(kept[name], value), name
        else:
            assert rel_err(kept[name], value) < 1e-5, name
    token_bytes = 4 * b * l
    extra = _saved_activation_bytes(mixer_body_triton, inputs, keep_activations=True, **kwargs) \
        - _saved_activation_bytes(mixer_body_triton, inputs, **kwargs)
    assert extra == token_bytes * (h * p + 2 * g * n) + token_bytes * h * p


class _RankZeroOfTwoEqualRanks:
    """out_scatter (kernels.reference.mixer_body says what it supplies) for rank 0 of two ranks
    that hold the same partial sums, split by batch rows: rank 0's rows of both ranks' terms
    are this partial's, and backward's gather brings rank 1's rows of the output gradient, given."""

    def __init__(self, other_rows_grad):
        self.other_rows_grad = other_rows_grad

    def matmul_parts(self, a, w_t):
        return torch.stack([(a @ w_t)[: a.shape[0] // 2]] * 2)

    def gather_matmul(self, g, w):
        full = torch.cat([g, self.other_rows_grad.to(g)])
        return full, full @ w


def test_out_scatter_returns_this_ranks_rows_and_takes_every_ranks_gradient():
    # The op's out_proj through an out_scatter (tensor parallelism's fused collectives) against
    # the plain op: forward, this rank's rows of every rank's term; backward (the terms' one
    # gradient, the sum's, as add_rmsnorm gives it), the gradients of the plain op's partial sum
    # under every rank's rows of the output gradient
    b, l, h, p, g, n, d_model, chunk, options, kwargs = CASES["g2_channel_D_docs_dt_limit"]
    inputs = make_inputs(b, l, h, p, g, n, d_model, **options)
    kwargs = kwargs | dict(ngroups=g, chunk_size=chunk, norm_eps=1e-5)
    grad = torch.randn(b, l, d_model, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def gradients(out_scatter):
        leaves = {k: (v.detach().clone().requires_grad_(True) if k in GRADS else v) for k, v in inputs.items()}
        out = mixer_body_triton(**leaves, **kwargs, out_scatter=out_scatter)
        out.backward(grad[: b // 2].expand(2, -1, -1, -1) if out_scatter is not None else grad)
        return out.detach(), {k: leaves[k].grad for k in GRADS}

    out, grads = gradients(_RankZeroOfTwoEqualRanks(grad[b // 2:]))
    partial, expected = gradients(None)
    assert out.shape == (2, b // 2, l, d_model)
    assert torch.equal(out, partial[: b // 2].expand(2, -1, -1, -1))
    for name, value in expected.items():
        if DEVICE == "cpu":
            assert torch.equal(grads[name], value), name
        else:   # the backward's atomic sums add in any order on a GPU
            assert rel_err(grads[name], value) < 1e-5, name


def test_out_scatter_terms_used_apart_from_their_sum_are_refused_in_backward():
    # each term's gradient must be the sum's (one tensor): the op's backward sends only that
    b, l, h, p, g, n, d_model, chunk, options, kwargs = CASES["g2_channel_D_docs_dt_limit"]
    inputs = make_inputs(b, l, h, p, g, n, d_model, **options)
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in GRADS else v) for k, v in inputs.items()}
    out = mixer_body_triton(**leaves, **kwargs, ngroups=g, chunk_size=chunk,
                            out_scatter=_RankZeroOfTwoEqualRanks(torch.zeros(b - b // 2, l, d_model)))
    with pytest.raises(RuntimeError, match="only through their sum"):
        (out[0] * 2 + out[1]).sum().backward()


def test_rejects_inconsistent_sizes():
    inputs = make_inputs(1, 16, 2, 8, 1, 8, 16)
    inputs["zxbcdt"] = inputs["zxbcdt"][..., :-1]
    with pytest.raises(ValueError, match=r"zxbcdt: expected shape \(batch, seqlen, 50\)"):
        mixer_body_triton(**inputs, ngroups=1, chunk_size=16)
    inputs = make_inputs(1, 16, 2, 8, 1, 8, 16)
    with pytest.raises(ValueError, match="ngroups dividing nheads"):
        mixer_body_triton(**inputs, ngroups=3, chunk_size=16)
    with pytest.raises(ValueError, match=r"D: expected shape \(2,\) or \(2, 8\)"):
        mixer_body_triton(**(inputs | {"D": inputs["D"][:1]}), ngroups=1, chunk_size=16)
    with pytest.raises(ValueError, match=r"seq_idx: expected an integer tensor"):
        mixer_body_triton(**(inputs | {"seq_idx": torch.zeros(1, 16)}), ngroups=1, chunk_size=16)


def test_model_training_path_equals_op_by_op_path():
    """The mixer without carried state takes kernels.mixer_body; with return_state it takes the
    ops one by one. Same output and gradients (on CPU both are the reference ops: bit-equal)."""
    cfg = ModelConfig(d_model=32, n_layer=1, vocab_size=64, d_state=16, headdim=8, ngroups=2, chunk_size=16)
    torch.manual_seed(0)
    mixer = Mamba2Mixer(cfg)
    u = torch.randn(2, 40, cfg.d_model)
    seq_idx = torch.zeros(2, 40, dtype=torch.int32)
    seq_idx[:, 25:] = 1
    results = []
    for return_state in (False, True):
        mixer.zero_grad(set_to_none=True)
        out = mixer(u, seq_idx=seq_idx, return_state=return_state)
        out = out[0] if return_state else out
        out.pow(2).sum().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in mixer.named_parameters()}))
    (fused, fused_grads), (chained, chained_grads) = results
    assert torch.equal(fused, chained)
    for name, grad in fused_grads.items():
        assert torch.equal(grad, chained_grads[name]), name


@pytest.mark.gpu
def test_gpu_bf16_layer_shape_matches_fp32_reference_and_chained_ops(monkeypatch):
    # one 1.3b layer's shapes (d_model 2048, 64 heads of 64, n 128) at batch 2 × 2048, two documents
    b, l, h, p, g, n, d_model = 2, 2048, 64, 64, 1, 128, 2048
    inputs = make_inputs(b, l, h, p, g, n, d_model, device="cuda", docs=1)
    kwargs = dict(ngroups=g, chunk_size=256, norm_eps=1e-5)
    half = {k: (v.to(torch.bfloat16) if k == "zxbcdt" else v) for k, v in inputs.items()}
    ours = run(mixer_body_triton, half, **kwargs)
    ref = run(reference.mixer_body, inputs, **kwargs)
    chained = run(_chained_triton_ops(monkeypatch), half, **kwargs)   # after ref: it patches the reference ops
    errors = check_all(ours, ref, BF16_BOUND, "bf16 vs fp32 reference")
    print("mixer_body bf16 vs fp32:", " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    check_all(ours, chained, BF16_BOUND, "bf16 vs the chained Triton ops")


def test_rows_padded_input_gives_the_same_results_and_gradient_in_its_layout():
    """in_proj's output may come with rows padded to 16 elements (mamba_train/model/padded_rows.py):
    the op reads it in place, gives what it gives on the contiguous tensor, bit for bit, and
    hands back the gradient in the same padded layout (in_proj's backward reads it so)."""
    b, l, h, p, g, n, d_model, chunk, options, kwargs = CASES["g2_channel_D_docs_dt_limit"]
    inputs = make_inputs(b, l, h, p, g, n, d_model, **options)
    width = inputs["zxbcdt"].shape[-1]
    padded = torch.zeros(b, l, width + 16 - width % 16, device=DEVICE)
    padded[..., :width] = inputs["zxbcdt"]
    leaf = padded.requires_grad_(True)
    rows = leaf[..., :width]
    grad_strides = []
    rows.register_hook(lambda grad: grad_strides.append(grad.stride()))
    out = mixer_body_triton(**(inputs | {"zxbcdt": rows}), ngroups=g, chunk_size=chunk, norm_eps=1e-5, **kwargs)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    (out * g_out).sum().backward()
    contiguous = inputs["zxbcdt"].clone().requires_grad_(True)
    expected = mixer_body_triton(**(inputs | {"zxbcdt": contiguous}), ngroups=g, chunk_size=chunk, norm_eps=1e-5,
                                 **kwargs)
    (expected * g_out).sum().backward()
    assert torch.equal(out, expected)
    assert grad_strides == [rows.stride()]
    assert torch.equal(leaf.grad[..., :width], contiguous.grad)
    assert not leaf.grad[..., width:].any()
