"""Chunked SSD (Mamba-2) as Triton kernels, one file per stage (DESIGN §3)."""

from .combined import ssd_triton

__all__ = ["ssd_triton"]
