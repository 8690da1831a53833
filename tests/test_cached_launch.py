"""kernels.cached_launch: launches that reuse a compiled kernel must be exactly the launches
Triton would have specialised alike (the key), and run the same kernel Triton would.

The key tests run anywhere (a JITFunction is built without compiling); the launch tests need
a GPU: under TRITON_INTERPRET the decorator leaves kernels to the interpreter."""

import pytest
import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.jit import JITFunction

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
