"""Cross-entropy of each row of a logits slice, and its gradient written over the logits.

Per row, with m the max, s = sum_v exp(logit_v - m) and lse = m + log s:
    loss = lse - logit[label]
    grad_v = (exp(logit_v - lse) - [v == label]) · scale      (softmax minus one-hot)
Two passes over the row (an online max/sum, then the gradient) read its logits twice and
write them once, in the logits' dtype; nothing of (rows × vocab) size exists in fp32. The
row of a 50k vocabulary (100 KB in bf16) is still in L2 for the second pass. A row whose
scale is 0 (an ignored label) gets a zero gradient; its loss is still computed (the
caller masks it).

When the vocabulary is split over ranks (tensor parallelism), a row's lse needs every
rank's part before the gradient pass can run, so the two passes are also kernels of their
own: `logsumexp_rows_triton` (pass 1, and the label's logit where this rank holds it) and
`softmax_grad_rows_triton` (pass 2, from the combined lse). Their lse folds the max in, so
the gradient's exponent carries fp32's rounding at the lse's magnitude: fewer digits than the
fused kernel keeps for logits in the thousands, none lost at the logits training sees.
"""

import torch
import triton
import triton.language as tl

from ..cached_launch import cached_launch
from ..host_math import next_power_of_2


@triton.jit
def _row_max_and_log_sum(logits_ptr, VOCAB: tl.constexpr, BLOCK_V: tl.constexpr):
    # pass 1: running max and sum of exp, one block of the vocabulary at a time → (m, log s)
    row_max = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, VOCAB, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        block = tl.load(logits_ptr + cols, mask=cols < VOCAB, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, block)
        # a lane that has seen only -inf (past the vocabulary) subtracts 0, not -inf: its
        # exps are then exp(-inf) = 0 instead of exp(-inf - -inf) = nan
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - shift) + tl.exp(block - shift)
        row_max = new_max
    m = tl.max(row_max, axis=0)
    # log-sum-exp relative to the max: kept apart from m so that large logits lose no digits
    return m, tl.log(tl.sum(row_sum * tl.exp(row_max - m), axis=0))


@triton.jit
def _write_row_grad(logits_ptr, m, log_sum, label, scale, VOCAB: tl.constexpr, BLOCK_V: tl.constexpr):
    # pass 2: (softmax − one-hot) · scale over the row; a label outside [0, VOCAB) adds no one-hot
    for start in range(0, VOCAB, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < VOCAB
        block = tl.load(logits_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        grad = (tl.exp((block - m) - log_sum) - tl.where(cols == label, 1.0, 0.0)) * scale
        tl.store(logits_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=ok)


@cached_launch
@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, labels_ptr, scale_ptr, loss_ptr, stride_row,
    VOCAB: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # VOCAB is a compile-time constant: one compile per model vocabulary
    row = tl.program_id(0)
    logits_ptr += row.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + row)
    m, log_sum = _row_max_and_log_sum(logits_ptr, VOCAB, BLOCK_V)
    target = tl.load(logits_ptr + tl.maximum(label, 0)).to(tl.float32)
    tl.store(loss_ptr + row, (m - target) + log_sum)
    if WRITE_GRAD:
        _write_row_grad(logits_ptr, m, log_sum, label, tl.load(scale_ptr + row), VOCAB, BLOCK_V)


@cached_launch
@triton.jit
def _logsumexp_rows_kernel(logits_ptr, labels_ptr, lse_ptr, target_ptr, stride_row,
                           VOCAB: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    logits_ptr += row.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + row)
    m, log_sum = _row_max_and_log_sum(logits_ptr, VOCAB, BLOCK_V)
    tl.store(lse_ptr + row, m + log_sum)
    here = (label >= 0) & (label < VOCAB)
    target = tl.load(logits_ptr + tl.where(here, label, 0)).to(tl.float32)
    tl.store(target_ptr + row, tl.where(here, target, 0.0))


@cached_launch
@triton.jit
def _softmax_grad_rows_kernel(logits_ptr, labels_ptr, lse_ptr, scale_ptr, stride_row,
                              VOCAB: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    logits_ptr += row.to(tl.int64) * stride_row
    _write_row_grad(logits_ptr, tl.load(lse_ptr + row), 0.0, tl.load(labels_ptr + row), tl.load(scale_ptr + row),
                    VOCAB, BLOCK_V)


def _launch(kernel, logits, *args, **constexprs):
    # one program per row, the vocabulary in blocks of up to 4096
    rows, vocab = logits.shape
    assert logits.stride(1) == 1, "logits must have unit stride along the vocabulary"
    block_v = min(4096, next_power_of_2(vocab))
    kernel[(rows,)](logits, *args, logits.stride(0), VOCAB=vocab, BLOCK_V=block_v,
                    num_warps=8 if block_v >= 2048 else 4, **constexprs)


def cross_entropy_rows_triton(logits, labels, grad_scale=None):
    """logits: (rows, vocab), unit stride along vocab; labels: (rows,) ints (negative: ignored,
    its loss meaningless). Returns the fp32 loss per row. With grad_scale (rows,), the
    logits are overwritten by d(sum_r grad_scale[r] · loss[r]) / d logits."""
    loss = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
    if logits.shape[0]:
        scale = grad_scale.to(torch.float32).contiguous() if grad_scale is not None else None
        _launch(_cross_entropy_rows_kernel, logits, labels.contiguous(), scale, loss,
                WRITE_GRAD=grad_scale is not None)
    return loss


def logsumexp_rows_triton(logits, labels):
    """logits: (rows, vocab); labels: (rows,) ints → (lse, target), fp32 (rows,): the
    log-sum-exp of each row, and its logit at the label where 0 <= label < vocab (else 0)."""
    lse = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
    target = torch.empty_like(lse)
    if logits.shape[0]:
        _launch(_logsumexp_rows_kernel, logits, labels.contiguous(), lse, target)
    return lse, target


def softmax_grad_rows_triton(logits, labels, lse, grad_scale):
    """Overwrite logits (rows, vocab) by (exp(logit - lse) - one-hot(label)) · grad_scale, per
    row; a label outside [0, vocab) adds no one-hot (it lies on another rank's vocabulary)."""
    if logits.shape[0]:
        _launch(_softmax_grad_rows_kernel, logits, labels.contiguous(), lse.to(torch.float32).contiguous(),
                grad_scale.to(torch.float32).contiguous())
