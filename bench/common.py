"""What the GPU benches share: timing, the copy-bandwidth ceiling, where results go."""

import re
import sys
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


def fwd_fwdbwd_ms(forward, dout, leaves, timer=bench_ms, name="", may_fail=False):
    """(forward ms, forward+backward ms) of `forward() -> tensor` under `timer` (bench_ms or
    graph_ms), the backward from `dout` with the leaves' gradients reset each call. With
    `may_fail` (an anchor, which need not capture) a graph that cannot be captured gives
    (None, None) and a line on stderr; ours must capture."""
    try:
        with torch.no_grad():
            fwd = timer(forward)
        return fwd, timer(lambda: forward().backward(dout), grad_to_none=leaves)
    except RuntimeError as err:
        if timer is bench_ms or not may_fail:
            raise
        print(f"# {name}: no CUDA-graph timing ({str(err)[:200]})", file=sys.stderr)
        return None, None


def capture_forward_backward(forward_backward, model, warmup=3):
    """(CUDA graph of forward_backward(), its return value during the capture): the trainer's
    recipe (`mamba_train.train.cuda_graph.capture_graph`: warm-up calls on a side stream, where Triton
    compiles, NCCL connects and the allocator settles), captured with the gradients unset, so
    that the graph owns them: each replay rewrites them, and nothing may zero them between
    replays. forward_backward must run autocast with cache_enabled=False: the cache must not
    hold casts across the capture's boundary."""
    from mamba_train.train.cuda_graph import capture_graph

    return capture_graph(lambda _: forward_backward(), {}, warmup,
                         before_capture=lambda: model.zero_grad(set_to_none=True))


def cuda_kernel_events(prof):
    """The kernels among a torch.profiler run's averaged events: CUDA-side, without the user
    annotations that the GPU timeline also carries (Optimizer.step#…, record_function ranges),
    whose time is their kernels' again."""
    return [e for e in prof.key_averages()
            if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


# substrings of the CUDA kernels that are matrix products (cuBLAS's, CUTLASS's, nvjet's)
MATMUL_KERNELS = ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90", "matmul")


def is_matmul_kernel(name: str) -> bool:
    lowered = name.lower()
    return any(key in lowered for key in MATMUL_KERNELS)


def cuda_time_by_kernel(step, steps=2):
    """{kernel name: CUDA ms per step} over `steps` calls of step() (CUDA activity only: quick
    to collect; kernels replayed from a CUDA graph are listed one by one too)."""
    from collections import defaultdict
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    times = defaultdict(float)
    for event in cuda_kernel_events(prof):
        times[event.key] += event.self_device_time_total / 1e3 / steps
    return dict(times)


def cuda_kernel_timeline(step, keep=lambda name: True, steps=2):
    """[(kernel name, start µs, duration µs)] of the CUDA kernels whose names `keep` admits, in
    the order they started, over `steps` calls of step()."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False) and keep(e.name)]
    return [(e.name, e.time_range.start, e.time_range.elapsed_us())
            for e in sorted(kernels, key=lambda e: e.time_range.start)]


def copy_bandwidth(nbytes):
    """Bytes read + written per second by a device copy moving `nbytes` in all."""
    src = torch.randn(nbytes // 4, device="cuda", dtype=torch.bfloat16)   # 2 bytes read + 2 written each
    dst = torch.empty_like(src)
    return 4 * src.numel() / (bench_ms(lambda: dst.copy_(src)) * 1e-3)


def results_path(kind, gpu):
    """bench/results/<kind>-<gpu model, as a slug>.json"""
    return RESULTS / f"{kind}-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-').lower()}.json"
