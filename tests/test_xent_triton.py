"""The Triton cross-entropy of logit rows (`kernels.triton_xent`) against the float64 reference.

Without CUDA the kernel runs under Triton's interpreter at small shapes; the `gpu` test runs
a real slice (5336 rows × 50304 vocabulary, bf16) against the fp32 reference.
"""


import pytest
import torch

pytest.importorskip("triton")

from kernels import reference  # noqa: E402
from kernels.reference import cross_entropy_rows  # noqa: E402
from kernels.triton_xent import cross_entropy_rows_triton, logsumexp_rows_triton, softmax_grad_rows_triton  # noqa: E402
from kernels.triton_xent import rows as xent_stage  # noqa: E402
from triton_device import triton_device  # noqa: E402

DEVICE = triton_device(xent_stage._cross_entropy_rows_kernel, "kernels.triton_xent")
FP32_BOUND = 1e-5   # fp32 logits, fp32 sums over the vocabulary: measured ~1e-7
HALF_BOUND = 1e-2   # bf16 gradients rounded once to 8 mantissa bits: ~2e-3


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(rows, vocab, dtype, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(rows, vocab, generator=gen)).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    labels[1::4] = -100   # ignored rows
    scale = torch.rand(rows, generator=gen).to(device) * (labels >= 0)
    return logits, labels, scale


@pytest.mark.parametrize("vocab", [7, 64, 300, 5000])   # one block, exact blocks, a partial last block, several blocks
@pytest.mark.parametrize("with_grad", [False, True])
def test_loss_and_gradient_equal_float64_reference(vocab, with_grad):
    logits, labels, scale = make(9, vocab, torch.float32)
    ref_logits = logits.double().cpu()
    ref_loss = cross_entropy_rows(ref_logits, labels.cpu(), scale.double().cpu() if with_grad else None)
    before = logits.clone()
    loss = cross_entropy_rows_triton(logits, labels, scale if with_grad else None)
    kept = labels.cpu() >= 0
    assert rel(loss.cpu()[kept], ref_loss[kept]) < FP32_BOUND
    if with_grad:
        assert rel(logits.cpu(), ref_logits) < FP32_BOUND
        assert torch.all(logits.cpu()[~kept] == 0)   # ignored rows: zero gradient
    else:
        assert torch.equal(logits, before)   # logits untouched without a gradient


def test_bf16_logits_with_a_row_stride():
    full, labels, scale = make(6, 700, torch.bfloat16)
    wide = torch.zeros(6, 800, device=DEVICE, dtype=torch.bfloat16)
    wide[:, :700] = full
    logits = wide[:, :700]   # rows 800 apart: the stride is read, not assumed
    ref = full.double().cpu()
    ref_loss = cross_entropy_rows(ref, labels.cpu(), scale.double().cpu())
    loss = cross_entropy_rows_triton(logits, labels, scale)
    kept = labels.cpu() >= 0
    assert rel(loss.cpu()[kept], ref_loss[kept]) < HALF_BOUND
    assert rel(logits.cpu(), ref) < HALF_BOUND
    assert torch.all(wide[:, 700:] == 0)   # nothing written past the row


def test_extreme_logits_stay_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0, 3.0], [-3e4, -3e4, -3e4, -3e4]], device=DEVICE)
    labels = torch.tensor([1, 2], device=DEVICE)
    ref = logits.double().cpu()
    ref_loss = cross_entropy_rows(ref, labels.cpu(), torch.ones(2, dtype=torch.float64))
    loss = cross_entropy_rows_triton(logits, labels, torch.ones(2, device=DEVICE))
    assert torch.isfinite(loss).all() and torch.isfinite(logits).all()
    assert rel(loss.cpu(), ref_loss) < FP32_BOUND and rel(logits.cpu(), ref) < FP32_BOUND


def split_vocabulary_loss(logits, labels, scale, shards, logsumexp_rows, softmax_grad_rows):
    """What tensor parallelism does with the two passes: each shard of the vocabulary gives
    its lse and its part of the label's logit; the combined lse drives each shard's gradient."""
    pieces = logits.chunk(shards, dim=1)
    starts = [sum(p.shape[1] for p in pieces[:i]) for i in range(shards)]
    stats = [logsumexp_rows(p, labels - start) for p, start in zip(pieces, starts)]
    lse = torch.logsumexp(torch.stack([s[0] for s in stats]), dim=0)
    target = torch.stack([s[1] for s in stats]).sum(0)
    for piece, start in zip(pieces, starts):
        softmax_grad_rows(piece, labels - start, lse, scale)
    return lse - target


@pytest.mark.parametrize("shards", [2, 3])
@pytest.mark.parametrize("vocab", [64, 5000])
def test_split_vocabulary_equals_whole_row(shards, vocab):
    # the two passes over shards of the vocabulary (labels in one shard, ignored rows too)
    # give the whole row's loss and gradient: Triton kernels and torch references both
    logits, labels, scale = make(9, vocab, torch.float32)
    ref_logits = logits.double().cpu()
    ref_loss = cross_entropy_rows(ref_logits, labels.cpu(), scale.double().cpu())
    kept = labels.cpu() >= 0
    for passes, data in (((logsumexp_rows_triton, softmax_grad_rows_triton), (logits, labels, scale)),
                         ((reference.logsumexp_rows, reference.softmax_grad_rows),
                          (logits.double().cpu(), labels.cpu(), scale.double().cpu()))):
        values = data[0].clone()   # the original logits again for each implementation
        loss = split_vocabulary_loss(values, data[1], data[2], shards, *passes)
        assert rel(loss.cpu()[kept], ref_loss[kept]) < FP32_BOUND
        assert rel(values.cpu(), ref_logits) < FP32_BOUND
        assert torch.all(values.cpu()[~kept] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("shards", [1, 2])   # 1: the fused kernel; 2: the two passes, as TP=2 runs them
def test_gpu_bf16_real_slice_matches_fp32_reference(shards, capsys):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run on the GPU machine: see bench/README.md)")
    logits, labels, scale = make(5336, 50304, torch.bfloat16, device="cuda")
    ref = logits.float()
    ref_loss = cross_entropy_rows(ref, labels, scale)
    if shards == 1:
        loss = cross_entropy_rows_triton(logits, labels, scale)
    else:
        loss = split_vocabulary_loss(logits, labels, scale, shards, logsumexp_rows_triton, softmax_grad_rows_triton)
    kept = labels >= 0
    errors = {"loss": rel(loss[kept], ref_loss[kept]), "grad": rel(logits, ref)}
    with capsys.disabled():
        print(f"\ncross_entropy_rows 5336x50304 bf16 vs fp32, {shards} shard(s): "
              + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    assert errors["loss"] < HALF_BOUND and errors["grad"] < HALF_BOUND
