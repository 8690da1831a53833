"""Cross-entropy over rows of logits as one Triton kernel: loss per row and, in place, its gradient.

`kernels.cross_entropy_rows` calls `cross_entropy_rows_triton` on CUDA tensors.
"""

from .rows import cross_entropy_rows_triton

__all__ = ["cross_entropy_rows_triton"]
