"""The Mamba-2 mixer between in_proj and out_proj's output (conv, SSD, gated norm, out_proj) as one
autograd Function over the Triton kernels, recomputing the conv's and the norm's outputs in
backward instead of keeping them.

`function.py` holds the Function and the public `mixer_body_triton`, which `kernels.mixer_body`
calls on CUDA tensors.
"""

from .function import mixer_body_triton

__all__ = ["mixer_body_triton"]
