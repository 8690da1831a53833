"""Cross-entropy of the tied LM head, a slice of tokens at a time.

`F.cross_entropy(F.linear(h, W).float(), y)` keeps the whole (tokens × vocab) logits in
fp32 for backward: at 16 × 2048 tokens and a 50k vocabulary that is 6.6 GB, plus as much
again for their gradient. Here each slice's logits live only while that slice is processed:
the forward computes the slice's loss and, when a gradient is wanted, its gradients for the
hidden states and the head at once (softmax − one-hot is all the backward needs), so
backward only scales the stored gradients by the incoming one. The matmuls run in the
autocast dtype when autocast is on (as `F.linear` would); `kernels.cross_entropy_rows`
(one Triton kernel on a GPU) does the softmax in fp32 and writes the gradient over the
logits, in their dtype. Tensor parallelism passes its own `rows_loss` (the same two passes
with a collective between them: `mamba_train/parallel/lm.py`), and the slicing stays here.
"""

from __future__ import annotations

import torch

from kernels import cross_entropy_rows
from kernels.wide_matmul import add_matmul_

IGNORE_INDEX = -100
_SLICE_BYTES = 1 << 30   # fp32 logits of one slice


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         reduction: str = "mean", rows_loss=cross_entropy_rows) -> torch.Tensor:
    """CE(hidden · weightᵀ, labels), mean over the labels that are not IGNORE_INDEX, or their sum.

    hidden: (tokens, d_model); weight: (vocab, d_model); labels: (tokens,). rows_loss(logits,
    labels, grad_scale) → loss per row, the gradient written over the logits when grad_scale
    is given: `kernels.cross_entropy_rows`'s contract. With a vocabulary shard for weight, a
    rows_loss that completes each row over the shards gives the whole loss, and the hidden
    gradient is this shard's part of it (the caller sums it over the shards).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', found {reduction!r}")
    device_type = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else hidden.dtype)
    rows = max(1, _SLICE_BYTES // (4 * weight.shape[0]))
    return _LinearCrossEntropy.apply(hidden, weight, labels, reduction, compute_dtype, rows, rows_loss)


class _LinearCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, labels, reduction, compute_dtype, rows, rows_loss):
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        valid = labels != IGNORE_INDEX
        total = torch.zeros((), device=hidden.device, dtype=torch.promote_types(compute_dtype, torch.float32))
        # a tensor, not a Python number: no wait for the GPU on every micro-batch
        scale = 1.0 / valid.sum().clamp_min(1).to(total.dtype) if reduction == "mean" else total.new_ones(())
        w = weight.to(compute_dtype)
        dhidden = torch.empty_like(hidden) if want_grad else None
        dweight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if want_grad else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                h = hidden[start:start + rows].to(compute_dtype)
                y, keep = labels[start:start + rows], valid[start:start + rows]
                logits = h @ w.T
                # one pass over the slice's logits: the loss per row and, when wanted, the
                # gradient (softmax − one-hot) · scale written over the logits
                grad_scale = keep.to(total.dtype) * scale if want_grad else None
                losses = rows_loss(logits, y, grad_scale)
                total += torch.where(keep, losses.to(total.dtype), 0.0).sum()
                if want_grad:
                    dhidden[start:start + rows] = logits @ w
                    # straight into the fp32 sum: no bf16 product per slice written and added
                    add_matmul_(dweight, logits.T, h)
        ctx.save_for_backward(dhidden, dweight)
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        dhidden, dweight = ctx.saved_tensors
        dh = dhidden * grad_loss.to(dhidden.dtype) if ctx.needs_input_grad[0] else None
        dw = (dweight * grad_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None, None
