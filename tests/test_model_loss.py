"""The sliced head + cross-entropy (model/loss.py) against F.cross_entropy over full logits."""

import pytest
import torch
import torch.nn.functional as F

from mamba_train.model import loss as loss_module
from mamba_train.model.loss import IGNORE_INDEX, linear_cross_entropy


def _inputs(tokens=37, d=24, vocab=53, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, d, generator=gen, dtype=torch.float64).requires_grad_()
    weight = (0.3 * torch.randn(vocab, d, generator=gen, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[::5] = IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("slice_rows", [1, 8, 1000])
def test_loss_and_gradients_equal_full_logits(monkeypatch, reduction, slice_rows):
    hidden, weight, labels = _inputs()
    # slices of `slice_rows` tokens: one token, several uneven slices, all at once
    monkeypatch.setattr(loss_module, "_SLICE_BYTES", 4 * weight.shape[0] * slice_rows)
    ours = linear_cross_entropy(hidden, weight, labels, reduction)
    (dh, dw) = torch.autograd.grad(3.0 * ours, (hidden, weight))
    ref = F.cross_entropy(F.linear(hidden, weight), labels, reduction=reduction, ignore_index=IGNORE_INDEX)
    (dh_ref, dw_ref) = torch.autograd.grad(3.0 * ref, (hidden, weight))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(dh, dh_ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-12, atol=1e-15)


def test_bf16_autocast_matches_fp32_within_bf16_rounding():
    hidden, weight, labels = (t.detach().float() if t.is_floating_point() else t for t in _inputs(tokens=64, d=32))
    hidden.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, weight, labels)
    ref = F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=IGNORE_INDEX)
    assert abs(ours.item() - ref.item()) / ref.item() < 1e-2   # bf16 logits: ~3 significant digits


def test_no_gradient_wanted_gives_the_loss_only():
    hidden, weight, labels = (t.detach() for t in _inputs())
    with torch.no_grad():
        ours = linear_cross_entropy(hidden, weight, labels, "sum")
    ref = F.cross_entropy(F.linear(hidden, weight), labels, reduction="sum", ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)


def test_unknown_reduction_is_refused():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, "none")


@pytest.mark.gpu
def test_gpu_bf16_slices_sum_the_head_gradient_in_fp32(monkeypatch):
    # the model's case on a GPU: bf16 hidden states, fp32 head weight, bf16 autocast; each
    # slice's weight gradient is added into the fp32 sum by one cuBLAS product (bf16 inputs,
    # fp32 output), not rounded to bf16 first
    hidden, weight, labels = _inputs(tokens=4096, d=64, vocab=1000)
    hidden = hidden.detach().cuda().to(torch.bfloat16).requires_grad_()
    weight = weight.detach().cuda().float().requires_grad_()
    labels = labels.cuda()
    monkeypatch.setattr(loss_module, "_SLICE_BYTES", 4 * weight.shape[0] * 512)   # 8 slices
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, weight, labels)
    dh, dw = torch.autograd.grad(ours, (hidden, weight))
    assert (dh.dtype, dw.dtype) == (torch.bfloat16, torch.float32)
    ref = F.cross_entropy(F.linear(hidden.double(), weight.double()), labels, ignore_index=IGNORE_INDEX)
    dh_ref, dw_ref = torch.autograd.grad(ref, (hidden, weight))
    for ours_grad, ref_grad in ((dh, dh_ref), (dw, dw_ref)):
        err = ((ours_grad.double() - ref_grad.double()).norm() / ref_grad.double().norm()).item()
        assert err < 1e-2, err   # bf16 logits and products: ~3 significant digits
