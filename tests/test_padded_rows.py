"""in_proj's product with 16-aligned output rows (mamba_train/model/padded_rows.py): the same
values and gradients as F.linear, in a padded layout, and the model's mixer handing that layout on."""

import pytest
import torch
import torch.nn.functional as F

import mamba_train.model.mamba2 as mamba2
from mamba_train.config import ModelConfig
from mamba_train.model import Mamba2Mixer
from mamba_train.model.padded_rows import ROW_MULTIPLE, padded_rows_linear


def _both(u, weight, fn):
    u, weight = u.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = fn(u, weight)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.device, out.dtype)
    (out * g).sum().backward()
    return out, u.grad, weight.grad


def test_values_and_gradients_equal_linear_in_a_padded_layout():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(2, 5, 24, generator=gen, dtype=torch.float64)
    weight = torch.randn(50, 24, generator=gen, dtype=torch.float64)
    out, du, dweight = _both(u, weight, padded_rows_linear)
    ref_out, ref_du, ref_dweight = _both(u, weight, F.linear)
    assert out.shape == (2, 5, 50) and out.stride() == (5 * 64, 64, 1)
    for ours, ref in ((out, ref_out), (du, ref_du), (dweight, ref_dweight)):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert padded_rows_linear(u, weight[:48]).is_contiguous()   # already a multiple of 16: the plain product


@pytest.mark.parametrize("rows", [40, 48])   # padded, and already a multiple of 16 (autocast's cast, taken here)
def test_under_autocast_computes_as_linear_does(rows):
    gen = torch.Generator().manual_seed(0)
    u, weight = torch.randn(3, 7, 32, generator=gen), torch.randn(rows, 32, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, du, dweight = _both(u, weight, padded_rows_linear)
        ref_out, ref_du, ref_dweight = _both(u, weight, F.linear)
    assert out.dtype == ref_out.dtype == torch.bfloat16 and dweight.dtype == torch.float32
    assert du.dtype == ref_du.dtype
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(du, ref_du, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dweight, ref_dweight, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [3352, 8512])   # 130m's in_proj (padded) and 1.3b's (not), at 8 × 512 tokens
def test_gpu_autocast_weight_gradient_comes_in_fp32_from_cublas(rows):
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(8, 512, 256, generator=gen).cuda()
    weight = (torch.randn(rows, 256, generator=gen) / 16).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, du, dweight = _both(u, weight, padded_rows_linear)
    assert out.dtype == torch.bfloat16 and dweight.dtype == torch.float32
    ref_out, ref_du, ref_dweight = _both(u.double(), weight.double(), F.linear)
    for ours, ref in ((out, ref_out), (du, ref_du), (dweight, ref_dweight)):
        err = ((ours.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, err   # bf16 operands: ~3 significant digits


def test_mixer_hands_padded_rows_to_the_mixer_body(monkeypatch):
    # 6 heads: in_proj's width 2·48 + 2·16 + 6 = 134 is not a multiple of 16
    cfg = ModelConfig(d_model=24, n_layer=1, vocab_size=64, d_state=16, headdim=8, ngroups=1, chunk_size=16)
    mixer = Mamba2Mixer(cfg)
    seen, body = [], mamba2.mixer_body

    def recording_body(zxbcdt, *args, **kwargs):
        seen.append(zxbcdt.stride())
        return body(zxbcdt, *args, **kwargs)

    monkeypatch.setattr(mamba2, "mixer_body", recording_body)
    out = mixer(torch.randn(2, 20, cfg.d_model))
    width = sum(mixer.split_sizes)
    assert width % ROW_MULTIPLE and seen == [(20 * 144, 144, 1)]
    out.sum().backward()
    assert mixer.in_proj.weight.grad.shape == (width, cfg.d_model)


def _parallel_in_proj_worker(rank, world, tp, cp):
    import copy

    from distributed import tiny_config
    from mamba_train.model import Mamba2LM
    from mamba_train.parallel import init_parallel, parallelize_model, validate_layout

    cfg = tiny_config(ngroups=2)   # in_proj's width 2·32 + 2·2·8 + 4 = 100: not a multiple of 16
    dims = init_parallel(validate_layout(cfg, 16, world, tp=tp, cp=cp))
    model = parallelize_model(copy.deepcopy(Mamba2LM(cfg)), dims)
    in_proj = model.layers[0].mixer.in_proj
    assert in_proj.pads_rows == (tp == 1)
    u = torch.randn(2, 8, cfg.d_model)
    out = in_proj(u)
    width = in_proj.weight.shape[0]
    assert out.stride(1) == (112 if tp == 1 else width)
    torch.testing.assert_close(out, F.linear(u, in_proj.weight))


@pytest.mark.distributed
@pytest.mark.parametrize("tp, cp", [(1, 2), (2, 1)])
def test_parallel_in_proj_pads_rows_when_its_tensor_parallel_group_has_one_rank(tp, cp):
    # CP and DP runs keep the one-process layout; under TP megatron's layer runs its own product
    pytest.importorskip("megatron.core", reason="megatron-core is in the [dev] extra")
    from distributed import run_workers

    run_workers(_parallel_in_proj_worker, 2, tp, cp)
