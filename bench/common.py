"""What the GPU benches share: timing, the copy-bandwidth ceiling, where results go."""

import re
from pathlib import Path

import torch
import triton

RESULTS = Path(__file__).resolve().parent / "results"


def bench_ms(fn, grad_to_none=None):
    """Median milliseconds of fn() (triton.testing.do_bench)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def graph_ms(fn, grad_to_none=None):
    """Median milliseconds of fn() replayed from a CUDA graph (triton.testing.do_bench_cudagraph):
    the GPU's time alone. do_bench's figure also holds the CPU's launch time wherever the CPU
    is slower than the kernels it launches, as for a many-kernel op at small shapes; inside a
    training step that CPU time overlaps earlier kernels, so this is the figure a step sees."""
    return triton.testing.do_bench_cudagraph(fn, rep=100, grad_to_none=grad_to_none, return_mode="median")


def copy_bandwidth(nbytes):
    """Bytes read + written per second by a device copy moving `nbytes` in all."""
    src = torch.randn(nbytes // 4, device="cuda", dtype=torch.bfloat16)   # 2 bytes read + 2 written each
    dst = torch.empty_like(src)
    return 4 * src.numel() / (bench_ms(lambda: dst.copy_(src)) * 1e-3)


def results_path(kind, gpu):
    """bench/results/<kind>-<gpu model, as a slug>.json"""
    return RESULTS / f"{kind}-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-').lower()}.json"
