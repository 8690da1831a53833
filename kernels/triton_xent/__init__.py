"""Cross-entropy over rows of logits in Triton: loss per row and, in place, its gradient; and
the same two passes as separate kernels for a vocabulary split over ranks.

`kernels.cross_entropy_rows`, `kernels.logsumexp_rows` and `kernels.softmax_grad_rows` call
these on CUDA tensors.
"""

from .rows import cross_entropy_rows_triton, logsumexp_rows_triton, softmax_grad_rows_triton

__all__ = ["cross_entropy_rows_triton", "logsumexp_rows_triton", "softmax_grad_rows_triton"]
