"""The chunked SSD reference equals the token-by-token oracle, forward and every gradient.

float64 on CPU at small shapes; errors are relative to the max abs of the oracle's value.
"""

import pytest
import torch

import kernels
from kernels.reference import ssd_chunked, ssd_sequential

TOL = 1e-10  # float64: both sides differ only by summation order


def rel_err(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def assert_rel_close(actual, expected, name, tol=TOL):
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = rel_err(actual.double(), expected.double())
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


def make_inputs(b=2, l=37, h=4, p=3, n=5, g=1, *, D="head", z=True, dt_bias=True,
                initial_states=True, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    inputs = dict(
        x=randn(b, l, h, p),
        dt=randn(b, l, h, scale=0.5) - 1.0,       # pre-softplus: dt' ≈ 0.1..1
        A=-(0.5 + torch.rand(h, generator=gen, dtype=torch.float64)).to(dtype),
        B=randn(b, l, g, n),
        C=randn(b, l, g, n),
    )
    if D == "head":
        inputs["D"] = randn(h)
    elif D == "channel":
        inputs["D"] = randn(h, p)
    if z:
        inputs["z"] = randn(b, l, h, p)
    if dt_bias:
        inputs["dt_bias"] = randn(h, scale=0.5)
    if initial_states:
        inputs["initial_states"] = randn(b, h, p, n)
    return inputs


def seq_idx_from_starts(l, starts_per_row, first_ids=None):
    """(b, l) document ids; row r's documents start at starts_per_row[r] (besides 0)."""
    rows = []
    for r, starts in enumerate(starts_per_row):
        first = 0 if first_ids is None else first_ids[r]
        row = torch.full((l,), first, dtype=torch.int64)
        for start in starts:
            row[start:] += 1
        rows.append(row)
    return torch.stack(rows)


def run_with_grads(fn, inputs, seed=1, **kwargs):
    """Outputs (y, final_states) and the grads of a random-weighted sum of both w.r.t. every input."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, final = fn(**leaves, return_final_states=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=gen, dtype=final.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y.detach(), final.detach(), dict(zip(leaves, grads))


def assert_chunked_matches_sequential(inputs, chunk_size, **kwargs):
    y_ref, final_ref, grads_ref = run_with_grads(ssd_sequential, inputs, **kwargs)
    y, final, grads = run_with_grads(ssd_chunked, inputs, chunk_size=chunk_size, **kwargs)
    assert_rel_close(y, y_ref, "y")
    assert_rel_close(final, final_ref, "final_states")
    for name in inputs:
        assert_rel_close(grads[name], grads_ref[name], f"grad of {name}")


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("seqlen", [32, 37])
@pytest.mark.parametrize("chunk_size", [4, 8, 16])
def test_chunked_matches_sequential(chunk_size, seqlen, ngroups):
    inputs = make_inputs(l=seqlen, g=ngroups)   # D, z, dt_bias, initial_states all on
    assert_chunked_matches_sequential(inputs, chunk_size)


@pytest.mark.parametrize("chunk_size", [4, 8, 16])
def test_chunked_matches_sequential_with_documents(chunk_size):
    l = 37
    inputs = make_inputs(l=l, g=2)
    # row 0: 4 documents, one starting on a chunk boundary for every chunk size (16), the others
    # mid-chunk, one of a single token (13); row 1: 3 documents with ids not starting at 0.
    seq_idx = seq_idx_from_starts(l, [[13, 14, 16, 30], [8, 21]], first_ids=[0, 5])
    assert_chunked_matches_sequential(inputs, chunk_size, seq_idx=seq_idx)


@pytest.mark.parametrize("D", ["head", "channel"])
def test_chunked_matches_sequential_for_D_shape(D):
    assert_chunked_matches_sequential(make_inputs(D=D), chunk_size=8)


def test_chunked_matches_sequential_with_clipping_dt_limit():
    inputs = make_inputs()
    dt_limit = (0.3, 0.6)
    processed = torch.nn.functional.softplus(inputs["dt"] + inputs["dt_bias"])
    # the limit must really clip on both sides, or this test proves nothing
    assert (processed < dt_limit[0]).any() and (processed > dt_limit[1]).any()
    assert_chunked_matches_sequential(inputs, chunk_size=8, dt_limit=dt_limit)
    unclipped = ssd_sequential(**inputs)
    assert rel_err(ssd_sequential(**inputs, dt_limit=dt_limit), unclipped) > 1e-3


def test_chunked_matches_sequential_without_optional_inputs():
    inputs = make_inputs(D=None, z=False, dt_bias=False, initial_states=False)
    inputs["dt"] = inputs["dt"].exp()   # already positive: used as is
    assert_chunked_matches_sequential(inputs, chunk_size=8, dt_softplus=False)


def test_sequential_matches_quadratic_form():
    # An independent third form (paper §3, the SSD "attention" dual): y = (L ∘ C Bᵀ) (dt·x)
    # with L[t, s] = exp(sum_{s<r<=t} A·dt_r), plus C_t · exp(sum_{r<=t} A·dt_r) · h_{-1},
    # plus D·x, then the whole times silu(z) (mamba_ssm gates after the D skip).
    l = 12
    inputs = make_inputs(b=1, l=l, h=2, g=1, D="channel", dt_bias=False)
    x, dt, B, C, z, h0 = (inputs[k][0] for k in ("x", "dt", "B", "C", "z", "initial_states"))
    A, D = inputs["A"], inputs["D"]
    dt = torch.nn.functional.softplus(dt)
    cum = torch.cumsum(dt * A, dim=0)                                        # (l, h)
    causal = torch.ones(l, l, dtype=torch.bool).tril()[..., None]
    L = torch.where(causal, torch.exp(cum[:, None] - cum[None, :]), torch.zeros(()))   # (t, s, h)
    scores = torch.einsum("tn,sn->ts", C[:, 0], B[:, 0])[..., None] * L     # (t, s, h)
    y = torch.einsum("tsh,shp->thp", scores, dt[..., None] * x)
    y = y + torch.einsum("tn,hpn,th->thp", C[:, 0], h0, torch.exp(cum))
    y = (y + D * x) * z * torch.sigmoid(z)
    assert_rel_close(ssd_sequential(**inputs)[0], y, "y")


@pytest.mark.parametrize("ngroups", [1, 2])
def test_chunked_matches_transformers_torch_ssd(ngroups):
    # the model must match transformers' Mamba2; its torch SSD takes no z or seq_idx, runs in float32
    mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    torch_ssd = getattr(mamba2, "mamba2_chunk_scan", None)
    if torch_ssd is None:
        pytest.skip("this transformers version has no mamba2_chunk_scan")
    inputs = {k: v.float() for k, v in make_inputs(g=ngroups, z=False).items()}
    y_hf, final_hf = torch_ssd(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], 8,
                               D=inputs["D"], dt_bias=inputs["dt_bias"],
                               initial_states=inputs["initial_states"], dt_softplus=True,
                               return_final_states=True)
    y, final = ssd_chunked(**inputs, chunk_size=8, return_final_states=True)
    assert_rel_close(y, y_hf, "y", tol=1e-5)
    assert_rel_close(final, final_hf, "final_states", tol=1e-5)


@pytest.mark.parametrize("fn", [ssd_sequential, ssd_chunked], ids=["sequential", "chunked"])
def test_seq_idx_resets_state_between_documents(fn):
    kwargs = {} if fn is ssd_sequential else {"chunk_size": 8}
    l, split = 30, 11
    inputs = make_inputs(l=l)
    packed, final = fn(**inputs, seq_idx=seq_idx_from_starts(l, [[split]] * 2),
                       return_final_states=True, **kwargs)

    def part(sl, with_init):
        sub = {k: (v[:, sl] if v.dim() >= 3 and v.shape[1] == l else v) for k, v in inputs.items()}
        if not with_init:
            del sub["initial_states"]
        return fn(**sub, return_final_states=True, **kwargs)

    # the initial state continues the first document only; the second starts from zero
    first, _ = part(slice(0, split), with_init=True)
    second, second_final = part(slice(split, l), with_init=False)
    assert_rel_close(packed, torch.cat([first, second], dim=1), "packed y")
    assert_rel_close(final, second_final, "final_states")


@pytest.mark.parametrize("with_documents", [False, True])
@pytest.mark.parametrize("fn", [ssd_sequential, ssd_chunked], ids=["sequential", "chunked"])
def test_final_state_carries_into_next_segment(fn, with_documents):
    kwargs = {} if fn is ssd_sequential else {"chunk_size": 8}
    l, split = 37, 19   # split mid-chunk and mid-document
    inputs = make_inputs(l=l)
    seq_idx = seq_idx_from_starts(l, [[7, 25], [30]]) if with_documents else None
    whole, whole_final = fn(**inputs, seq_idx=seq_idx, return_final_states=True, **kwargs)

    def part(sl):
        sub = {k: (v[:, sl] if v.dim() >= 3 and v.shape[1] == l else v) for k, v in inputs.items()}
        return sub, (seq_idx[:, sl] if with_documents else None)

    sub, ids = part(slice(0, split))
    first, carried = fn(**sub, seq_idx=ids, return_final_states=True, **kwargs)
    sub, ids = part(slice(split, l))
    sub["initial_states"] = carried
    second, second_final = fn(**sub, seq_idx=ids, return_final_states=True, **kwargs)
    assert_rel_close(torch.cat([first, second], dim=1), whole, "y")
    assert_rel_close(second_final, whole_final, "final_states")


def test_bf16_inputs_compute_in_float32():
    inputs64 = make_inputs(g=2)
    inputs16 = {k: v.to(torch.bfloat16) for k, v in inputs64.items()}
    y, final = ssd_chunked(**inputs16, chunk_size=8, return_final_states=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    y_ref, final_ref = ssd_sequential(**{k: v.double() for k, v in inputs16.items()},
                                      return_final_states=True)
    assert rel_err(final.double(), final_ref) < 1e-5      # float32 accumulation
    assert rel_err(y.double(), y_ref) < 1e-2              # one bf16 rounding of the output


@pytest.mark.parametrize("change, match", [
    (lambda i: i.update(dt=i["dt"][:, :-1]), r"dt: expected shape \(2, 37, 4\)"),
    (lambda i: i.update(A=i["A"][:2]), r"A: expected shape \(4,\)"),
    (lambda i: i.update(B=i["B"].expand(-1, -1, 3, -1), C=i["C"].expand(-1, -1, 3, -1)),
     r"ngroups=3 must divide nheads=4"),
    (lambda i: i.update(C=i["C"][..., :4]), r"C: expected shape \(2, 37, 1, 5\)"),
    (lambda i: i.update(D=i["D"][None].expand(2, -1)), r"D: expected shape \(4,\) or \(4, 3\)"),
    (lambda i: i.update(initial_states=i["initial_states"][..., :2]),
     r"initial_states: expected shape \(2, 4, 3, 5\).*found \(2, 4, 3, 2\)"),
    (lambda i: i.update(seq_idx=torch.zeros(2, 37)), r"seq_idx: expected an integer tensor"),
], ids=["dt", "A", "ngroups", "C", "D", "initial_states", "seq_idx_dtype"])
@pytest.mark.parametrize("fn", [ssd_sequential, ssd_chunked], ids=["sequential", "chunked"])
def test_bad_inputs_raise_clear_errors(fn, change, match):
    inputs = make_inputs()
    change(inputs)
    kwargs = {} if fn is ssd_sequential else {"chunk_size": 8}
    with pytest.raises(ValueError, match=match):
        fn(**inputs, **kwargs)


def test_package_exports_ssd_and_no_version():
    # on CPU tensors the public op is the reference, whatever submodules were imported before
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        import kernels.triton_ssd  # noqa: F401  (must not replace the attribute kernels.ssd)
    g = torch.Generator().manual_seed(0)
    x, dt = torch.randn(1, 9, 2, 3, generator=g), torch.randn(1, 9, 2, generator=g)
    A, B, C = -torch.rand(2, generator=g), torch.randn(1, 9, 1, 4, generator=g), torch.randn(1, 9, 1, 4, generator=g)
    assert callable(kernels.ssd)
    assert torch.equal(kernels.ssd(x, dt, A, B, C, 4), ssd_chunked(x, dt, A, B, C, 4))
    assert {"ssd", "ssd_sequential", "causal_conv1d", "rmsnorm_gated"} <= set(kernels.__all__)
    # transformers reads `kernels.__version__` to detect Hugging Face's hub package
    assert not hasattr(kernels, "__version__")
