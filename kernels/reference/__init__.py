"""Slow, obviously-correct torch versions of the kernels: the tests' oracle and the CPU path.
One module a family, as the Triton packages are split: `ssd` (the SSD and its stages), `conv`,
`norm` (with the residual add), `mixer` (the mixer body, chained from the others), `xent`
(cross-entropy by rows).

Compute dtype: float64 if the main input is float64, else float32 (bf16 inputs allowed).
`seq_idx` holds document ids, non-decreasing along l (not checked: that would sync a GPU).
"""

from .conv import causal_conv1d
from .mixer import mixer_body, parts_gradient
from .norm import add_rmsnorm, rmsnorm_gated
from .ssd import bmm_chunk, chunk_cumsum, chunk_scan, chunk_state, ssd_chunked, ssd_sequential, state_passing
from .xent import cross_entropy_rows, logsumexp_rows, softmax_grad_rows

__all__ = [
    "ssd_chunked", "ssd_sequential", "causal_conv1d", "rmsnorm_gated", "add_rmsnorm", "mixer_body", "parts_gradient",
    "cross_entropy_rows", "logsumexp_rows", "softmax_grad_rows",
    "chunk_cumsum", "chunk_state", "state_passing", "bmm_chunk", "chunk_scan",
]
