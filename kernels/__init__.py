"""mamba-train's kernels: chunked SSD, causal depthwise conv1d, gated grouped RMSNorm.

`ssd` is the public chunked SSD. For now it is the torch reference (`kernels.reference`);
a later change dispatches to the Triton kernels on CUDA with the same signature.
`ssd_sequential` is the token-by-token oracle the tests compare against.

This package shares its import name with Hugging Face's `kernels` hub package. It must not
define `__version__`: transformers probes `kernels.__version__` to decide whether the hub
package is installed.
"""

from .reference import causal_conv1d, rmsnorm_gated, ssd_sequential
from .reference import ssd_chunked as ssd

__all__ = ["ssd", "ssd_sequential", "causal_conv1d", "rmsnorm_gated"]
