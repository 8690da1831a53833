"""Causal depthwise conv1d (channels-last, width 2..4) as Triton kernels, forward and backward.

`conv1d.py` holds the kernels and their launchers; `function.py` the autograd Function and the
public `causal_conv1d_triton`, which `kernels.causal_conv1d` calls on CUDA tensors.
"""

from .function import causal_conv1d_triton

__all__ = ["causal_conv1d_triton"]
