"""mamba-train's kernels: chunked SSD, causal depthwise conv1d, gated grouped RMSNorm.

The public ops take the same arguments wherever they run:
- `ssd`: on CUDA tensors the Triton kernels (`kernels.triton_ssd`), elsewhere the torch
  reference (`kernels.reference`). No silent fallback: on a GPU without Triton it raises.
- `causal_conv1d`, `rmsnorm_gated`: the torch reference for now, on every device.
`ssd_sequential` is the token-by-token oracle the tests compare against.

Submodules are named for their implementation (`reference`, `triton_ssd`), never like an
op: the first import of a submodule `kernels.X` would replace the attribute `kernels.X`.

This package shares its import name with Hugging Face's `kernels` hub package. It must not
define `__version__`: transformers probes it to decide whether the hub package is installed.
"""

from .reference import causal_conv1d, rmsnorm_gated, ssd_chunked, ssd_sequential


def ssd(x, dt, A, B, C, chunk_size, **kwargs):
    """Chunked SSD (Mamba-2); see `kernels.reference.ssd_chunked` for the arguments and
    their semantics, which the Triton path shares."""
    if x.is_cuda:
        try:
            from .triton_ssd import ssd_triton
        except ImportError as err:
            raise RuntimeError(f"kernels.ssd on a CUDA tensor needs Triton ({err}); install mamba-train[gpu]") from err
        return ssd_triton(x, dt, A, B, C, chunk_size, **kwargs)
    return ssd_chunked(x, dt, A, B, C, chunk_size, **kwargs)


__all__ = ["ssd", "ssd_sequential", "causal_conv1d", "rmsnorm_gated"]
