"""Launching our Triton kernels for less host time than Triton's own `kernel[grid](...)`.

Why: each `JITFunction.run` binds and specialises every argument (our kernels take 16 to 47),
formats the options into its cache key, checks the kernel's globals and builds launch metadata
before it launches: about twice the compiled kernel's own launcher, and enough that an eager
SSD forward+backward enqueued more slowly than its kernels ran (figures: docs/design-notes.md,
bench/bench_launch.py).

`@cached_launch` above `@triton.jit` keeps, per launch key, the kernel Triton compiled for it,
and later launches with that key call its launcher directly. The key holds everything Triton
specialises on, at least as finely: each pointer argument's dtype and address modulo 16
(Triton specialises pointers on 16-byte alignment), every other argument by value (Triton
specialises integers on == 1, on divisibility by 16 and on width), the keyword arguments
(constexprs, num_warps, num_stages) by value, and the device. So launches that share a key
share a compiled kernel, and the first launch of a key goes through Triton unchanged.

The kernels name their pointer parameters `*_ptr` and list them first: the key reads the
pointers' dtypes and addresses and takes the other arguments as one tuple slice (3 µs for 47
arguments on a CI core, against 12 µs for Triton's binder). Launches go through Triton's own
path under TRITON_INTERPRET (the kernel is not a JITFunction then), for a grid given as a
function, while a launch hook is set (profilers such as proton see every launch through it)
and with ENABLED off. Triton's debug and instrumentation knobs are read at a key's first
launch only: set them before the run.
"""

import os

import torch
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

# MAMBA_TRAIN_CACHED_LAUNCH=0: every launch through Triton's own path (to rule this module out
# when debugging; bench/bench_launch.py compares the two).
ENABLED = os.environ.get("MAMBA_TRAIN_CACHED_LAUNCH", "1") != "0"
# A bound on each kernel's cache: keys hold shapes, so a run over many shapes (evaluation at
# every length) would otherwise keep one entry per shape. Cleared whole when reached.
MAX_KEYS = 4096


def launch_hooks_set():
    """Whether a launch hook is set: Triton 3.6 keeps them in HookChains (never None), whose
    calls list is empty when none is set; earlier versions, a callable or None."""
    enter, exit_ = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter)) or bool(getattr(exit_, "calls", exit_))


class CachedLaunch:
    """A @triton.jit kernel launched as `kernel[grid](*args, **constexprs_and_options)`, the
    pointer arguments first; launches reuse the compiled kernel of an earlier launch with the
    same key (module docstring)."""

    def __init__(self, kernel: JITFunction):
        self.kernel = kernel
        self.__name__ = kernel.__name__
        names = kernel.arg_names
        self.num_pointers = next((i for i, name in enumerate(names) if not name.endswith("_ptr")), len(names))
        if any(name.endswith("_ptr") for name in names[self.num_pointers:]):
            raise TypeError(f"{kernel.__name__}: cached_launch needs the pointer parameters (*_ptr) first, "
                            f"found {names}")
        self.launches = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def key(self, device, args, kwargs):
        n = self.num_pointers
        return (device, tuple(kwargs.items()), args[n:],
                *[None if a is None else (a.dtype, a.data_ptr() & 15) for a in args[:n]])

    def launch(self, grid, args, kwargs):
        if not ENABLED or callable(grid) or launch_hooks_set():
            return self.kernel[grid](*args, **kwargs)
        device = driver.active.get_current_device()
        key = self.key(device, args, kwargs)
        entry = self.launches.get(key)
        if entry is None:
            return self.first_launch(grid, args, kwargs, key, device)
        run, function, metadata, constexprs = entry
        run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
            driver.active.get_current_stream(device), function, metadata, None, None, None, *args, *constexprs)

    def first_launch(self, grid, args, kwargs, key, device):
        if any(isinstance(a, torch.Tensor) for a in args[self.num_pointers:]):
            raise TypeError(f"{self.__name__}: a tensor passed after the pointer parameters")
        if len(args) < self.num_pointers or any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            raise TypeError(f"{self.__name__}: pass the pointer arguments by position")
        compiled = self.kernel[grid](*args, **kwargs)
        # the compiled kernel's launcher takes every parameter in order: the positional
        # arguments, then the constexprs (keywords here, defaults where not given)
        binder = self.kernel.device_caches[device][4]
        bound = tuple(binder(*args, **kwargs)[0].values())
        if len(self.launches) >= MAX_KEYS:
            self.launches.clear()
        self.launches[key] = (compiled.run, compiled.function, compiled.packed_metadata, bound[len(args):])
        return compiled


def cached_launch(kernel):
    """Decorator above @triton.jit: the kernel's launches through CachedLaunch (unchanged under
    TRITON_INTERPRET, where triton.jit gives an interpreted function)."""
    return CachedLaunch(kernel) if isinstance(kernel, JITFunction) else kernel
