"""Gated grouped RMSNorm, rmsnorm(x·silu(z))·weight per group, as Triton kernels (forward and backward).

`rmsnorm.py` holds the kernels and their launchers; `function.py` the autograd Function and the
public `rmsnorm_gated_triton`, which `kernels.rmsnorm_gated` calls on CUDA tensors.
"""

from .function import rmsnorm_gated_triton

__all__ = ["rmsnorm_gated_triton"]
