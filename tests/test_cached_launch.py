"""kernels.cached_launch: launches that reuse a compiled kernel must be exactly the launches
Triton would have specialised alike (the key), and run the same kernel Triton would.

The key tests run anywhere (a JITFunction is built without compiling), and so does a test of
the launch path around a stand-in for Triton's kernel objects; the launch test against Triton
itself needs a GPU: under TRITON_INTERPRET the decorator leaves kernels to the interpreter."""

from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.jit import JITFunction

from kernels import cached_launch as cached_launch_module
from kernels.cached_launch import CachedLaunch, cached_launch, launch_hooks_set


def _scale_rows(x_ptr, out_ptr, rows, stride_row, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    values = tl.load(x_ptr + row * stride_row + offs)
    tl.store(out_ptr + row * BLOCK + offs, values * scale)


def _pointer_after_an_int(x_ptr, n, out_ptr):
    pass


def key_of(kernel, *args, device=0, **kwargs):
    return kernel.key(device, args, kwargs)


def test_launch_key_tells_apart_whatever_triton_specialises_on():
    kernel = CachedLaunch(JITFunction(_scale_rows))
    x = torch.zeros(64, 16)
    out = torch.zeros(64, 16)
    base = key_of(kernel, x, out, 64, 16, 2.0, BLOCK=16)
    assert key_of(kernel, torch.ones(64, 16), torch.ones(64, 16), 64, 16, 2.0, BLOCK=16) == base, \
        "fresh tensors of one dtype and alignment must reuse the compiled kernel"
    variants = {
        "an address off 16-byte alignment": key_of(kernel, x.view(-1)[1:], out, 64, 16, 2.0, BLOCK=16),
        "another dtype": key_of(kernel, x.half(), out, 64, 16, 2.0, BLOCK=16),
        "an int that becomes 1": key_of(kernel, x, out, 64, 1, 2.0, BLOCK=16),
        "an int no longer divisible by 16": key_of(kernel, x, out, 64, 17, 2.0, BLOCK=16),
        "a 64-bit int": key_of(kernel, x, out, 2 ** 33, 16, 2.0, BLOCK=16),
        "a constexpr": key_of(kernel, x, out, 64, 16, 2.0, BLOCK=32),
        "a launch option": key_of(kernel, x, out, 64, 16, 2.0, BLOCK=16, num_warps=8),
        "a pointer left out": key_of(kernel, x, None, 64, 16, 2.0, BLOCK=16),
        "another device": key_of(kernel, x, out, 64, 16, 2.0, BLOCK=16, device=1),
    }
    for what, key in variants.items():
        assert key != base, f"{what} must change the key"
    assert len(set(variants.values())) == len(variants)


def test_pointer_parameters_must_come_first():
    with pytest.raises(TypeError, match="pointer parameters"):
        CachedLaunch(JITFunction(_pointer_after_an_int))


def test_launch_hooks_are_seen_when_set():
    # a profiler's hook must see every launch, so that launches then go through Triton
    assert not launch_hooks_set(), "no launch hook is set in the tests"
    hook = lambda *_: None   # noqa: E731
    chain = knobs.runtime.launch_enter_hook
    if not hasattr(chain, "add"):
        pytest.skip("this Triton keeps its launch hook as a plain attribute")
    chain.add(hook)
    try:
        assert launch_hooks_set()
    finally:
        chain.remove(hook)
    assert not launch_hooks_set()


class _StandInKernel:
    """What CachedLaunch uses of a JITFunction: its parameter names, `kernel[grid](...)` (which
    compiles, launches and returns the compiled kernel) and the binder in its device cache.
    Each launch is recorded in `calls`: ("triton", ...) through Triton, ("launcher", ...) through
    the compiled kernel's own launcher."""
    arg_names = ["x_ptr", "out_ptr", "rows", "BLOCK"]
    __name__ = "stand_in"

    def __init__(self):
        self.calls = []
        calls = self.calls

        class Compiled:
            function, packed_metadata = "function", "metadata"

            def run(self, *args):
                calls.append(("launcher", args))
        self.compiled = Compiled()

        def binder(x_ptr, out_ptr, rows, BLOCK, **options):
            return {"x_ptr": x_ptr, "out_ptr": out_ptr, "rows": rows, "BLOCK": BLOCK}, None, options
        self.device_caches = {0: (None, None, None, None, binder)}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(("triton", grid, args, kwargs))
            return self.compiled
        return launch


def test_later_launches_of_a_key_call_the_compiled_launcher_with_every_argument(monkeypatch):
    stand_in = _StandInKernel()
    kernel = CachedLaunch(stand_in)
    monkeypatch.setattr(cached_launch_module, "driver", SimpleNamespace(active=SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda device: "stream")))
    x, out = torch.zeros(64), torch.zeros(64)
    kernel[(4,)](x, out, 64, BLOCK=16, num_warps=2)
    assert stand_in.calls == [("triton", (4,), (x, out, 64), {"BLOCK": 16, "num_warps": 2})]
    x2, out2 = torch.ones(64), torch.ones(64)
    kernel[(4, 2)](x2, out2, 64, BLOCK=16, num_warps=2)
    # the grid padded to three dimensions, the stream, the compiled function and metadata, no
    # launch metadata or hooks, then the arguments in parameter order (the constexpr last)
    assert stand_in.calls[1] == ("launcher", (4, 2, 1, "stream", "function", "metadata", None, None, None,
                                              x2, out2, 64, 16))
    for other_key in ((x[1:], out, 64), (x, out, 65)):   # a misaligned pointer, another int
        kernel[(4,)](*other_key, BLOCK=16, num_warps=2)
        assert stand_in.calls[-1][0] == "triton"
    monkeypatch.setattr(cached_launch_module, "ENABLED", False)
    kernel[(4,)](x2, out2, 64, BLOCK=16, num_warps=2)
    assert stand_in.calls[-1][0] == "triton", "MAMBA_TRAIN_CACHED_LAUNCH=0 must launch through Triton"
    assert len(kernel.launches) == 3


def test_a_tensor_after_the_pointers_is_refused():
    kernel = CachedLaunch(_StandInKernel())
    with pytest.raises(TypeError, match="after the pointer parameters"):
        kernel.first_launch((1,), (torch.zeros(4), torch.zeros(4), torch.zeros(1)), {"BLOCK": 16}, None, 0)


def test_interpreted_kernels_are_left_to_triton():
    interpreted = object()   # triton.jit's result under TRITON_INTERPRET is not a JITFunction
    assert cached_launch(interpreted) is interpreted


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled launches")
def test_cached_launches_match_triton_and_respecialise_on_misaligned_pointers():
    kernel = CachedLaunch(triton.jit(_scale_rows))
    x = torch.randn(64 * 16 + 8, device="cuda")
    rows = x[:64 * 16].view(64, 16)
    for source in (rows, rows.clone(), x[1:64 * 16 + 1].view(64, 16), x[8:8 + 64 * 16].view(64, 16)):
        out = torch.empty(64, 16, device="cuda")
        kernel[(64,)](source, out, 64, source.stride(0), 3.0, BLOCK=16)
        torch.testing.assert_close(out, source * 3.0, rtol=0, atol=0)
    # aligned (twice: one key), 4-byte offset, 32-byte offset (aligned again): two kernels, two keys
    assert len(kernel.launches) == 2
    compiled = {entry[1] for entry in kernel.launches.values()}
    assert len(compiled) == 2, "the misaligned launch must run a kernel compiled without the alignment"
