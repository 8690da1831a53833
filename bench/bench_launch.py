"""What the host spends launching our Triton kernels: the CPU side of an eager SSD call.

    python bench/bench_launch.py [--shape b8_L2048_h32] [--profile]

An eager SSD forward+backward can enqueue its kernels more slowly than the GPU runs them
and its do_bench figure is then the CPU's. This splits that time:
  - per launch of each of the call's kernels: Triton's `JITFunction.run` (binding and
    specialising every argument, its cache key, the launch), our `kernels.cached_launch`
    path, and Triton's binder alone;
  - per call: the enqueue time through Triton's path, through cached_launch, and with no
    Triton launch at all (the torch ops and the Python around them); --profile adds a
    cProfile of the call as shipped;
  - per phase, with cached launches: the forward (of it, SSDFunction.forward's body) and the
    backward (of it, SSDFunction.backward's body; the rest is the autograd engine).
Timings are CPU means over many calls (median of 5 repeats), from perf_counter; no GPU timing.
"""

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_ssd import SHAPES, make_ssd_inputs  # noqa: E402
from kernels import cached_launch  # noqa: E402
from kernels.cached_launch import CachedLaunch  # noqa: E402
from kernels.triton_ssd import ssd_triton  # noqa: E402
from kernels.triton_ssd.combined import SSDFunction  # noqa: E402


def launches_replaced(launch):
    """CachedLaunch.launch replaced by `launch(cached, original, grid, args, kwargs)` for a block."""
    original = CachedLaunch.launch
    return mock.patch.object(CachedLaunch, "launch",
                             lambda self, grid, args, kwargs: launch(self, original, grid, args, kwargs))


def record_launches(call):
    """[(CachedLaunch, grid, args, kwargs)] of every kernel launch call() makes."""
    launches = []

    def launch(cached, original, grid, args, kwargs):
        launches.append((cached, grid, args, kwargs))
        return original(cached, grid, args, kwargs)
    with launches_replaced(launch):
        call()
    return launches


def cpu_us(fn, calls=2000, repeats=5):
    """Median over `repeats` of the mean CPU microseconds of fn() over `calls` calls."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    means = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - started) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(means)


def timed_phases(totals):
    """SSDFunction's forward and backward bodies timed into totals["forward body"] and
    totals["backward body"], for a block."""
    def timed(name, fn):
        def wrapper(*args):
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                totals[name] += time.perf_counter() - started
        return staticmethod(wrapper)
    return mock.patch.multiple(SSDFunction, forward=timed("forward body", SSDFunction.forward),
                               backward=timed("backward body", SSDFunction.backward))


def phase_table(forward, backward, calls=200):
    """Where a call's CPU time goes: the forward (the apply and our forward body) and the
    backward (the autograd engine and our backward body), µs per call."""
    totals = Counter()
    with timed_phases(totals):
        for _ in range(20):
            backward(forward())
        torch.cuda.synchronize()
        totals.clear()
        for _ in range(calls):
            started = time.perf_counter()
            out = forward()
            totals["forward"] += time.perf_counter() - started
            started = time.perf_counter()
            backward(out)
            totals["backward"] += time.perf_counter() - started
        torch.cuda.synchronize()
    us = {k: v / calls * 1e6 for k, v in totals.items()}
    print("\n| µs a call | forward | of it, SSDFunction.forward | backward | of it, SSDFunction.backward |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| cached launches | {us['forward']:.0f} | {us['forward body']:.0f} | {us['backward']:.0f} "
          f"| {us['backward body']:.0f} |")


def per_launch_table(launches):
    print("| kernel | arguments | JITFunction.run µs | cached_launch µs | Triton's binder µs |")
    print("| --- | --- | --- | --- | --- |")
    totals = [0.0, 0.0, 0.0]
    device = torch.cuda.current_device()
    for cached, grid, args, kwargs in launches:
        binder = cached.kernel.device_caches[device][4]
        times = (cpu_us(lambda: cached.kernel[grid](*args, **kwargs), calls=500),
                 cpu_us(lambda: cached[grid](*args, **kwargs), calls=500),
                 cpu_us(lambda: binder(*args, **kwargs), calls=500))
        totals = [t + u for t, u in zip(totals, times)]
        print(f"| {cached.__name__} | {len(args)} | " + " | ".join(f"{t:.1f}" for t in times) + " |")
    print("| all | | " + " | ".join(f"{t:.1f}" for t in totals) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="b8_L2048_h32", choices=SHAPES)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--profile", action="store_true", help="also a cProfile of the call as shipped")
    args = parser.parse_args()
    inputs, leaves = make_ssd_inputs(*SHAPES[args.shape])
    dy = torch.randn_like(inputs["x"])

    def forward_backward():
        for t in leaves:
            t.grad = None
        ssd_triton(**inputs, chunk_size=args.chunk_size, dt_softplus=True).backward(dy)

    forward_backward()
    launches = record_launches(forward_backward)
    print(f"# {torch.cuda.get_device_name()}, {args.shape}: {len(launches)} Triton launches a forward+backward\n")
    per_launch_table(launches)

    with mock.patch.object(cached_launch, "ENABLED", False):
        through_triton = cpu_us(forward_backward, calls=20)
    through_cache = cpu_us(forward_backward, calls=20)
    with launches_replaced(lambda *_: None):
        without = cpu_us(forward_backward, calls=20)
    print("\n| forward+backward enqueue, µs | through JITFunction.run | through cached_launch | no Triton launches |")
    print("| --- | --- | --- | --- |")
    print(f"| {args.shape} | {through_triton:.0f} | {through_cache:.0f} | {without:.0f} |")
    phase_table(lambda: ssd_triton(**inputs, chunk_size=args.chunk_size, dt_softplus=True),
                lambda y: (y.backward(dy), [setattr(t, "grad", None) for t in leaves]))
    if args.profile:
        print("\n# cProfile of 20 calls as shipped")
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [forward_backward() for _ in range(20)])
        torch.cuda.synchronize()
        pstats.Stats(profiler).strip_dirs().sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
