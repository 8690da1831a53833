"""Chunked SSD (Mamba-2) as Triton kernels, one file per stage (DESIGN §3)."""

from .. import triton_interpreter  # noqa: F401  (its loops run to run-time bounds)
from .combined import ssd_triton

__all__ = ["ssd_triton"]
