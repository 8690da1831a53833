"""Gated grouped RMSNorm, rmsnorm(x·silu(z))·weight per group, as Triton kernels (forward and
backward), and the residual add fused with a plain RMSNorm.

`rmsnorm.py` holds the kernels and their launchers; `function.py` the autograd Functions and the
public `rmsnorm_gated_triton` and `add_rmsnorm_triton`, which `kernels.rmsnorm_gated` and
`kernels.add_rmsnorm` call on CUDA tensors.
"""

from .function import add_rmsnorm_triton, rmsnorm_gated_triton

__all__ = ["add_rmsnorm_triton", "rmsnorm_gated_triton"]
