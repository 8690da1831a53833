"""What the row stride of in_proj's output costs the kernels that read its column slices.

The mixer's conv reads x|B|C, and the gated norm z, as column slices of in_proj's output
(b, l, W) with W = 2·d_inner + 2·ngroups·d_state + nheads; their backward kernels write into the
same layout. Triton proves a row's loads contiguous and aligned, and so issues 16-byte vector
loads, only when it knows the row stride is divisible by 16 elements (it specialises integer
arguments on that). At 130m W = 3352 (24 heads) is not, at 1.3b W = 8512 is. This times each
kernel on slices of a (b, l, W) buffer beside the same slices of a buffer padded to W rounded up
to 16, bf16, medians of the kernels replayed from a CUDA graph (`bench.common.graph_ms`: a
call's CPU time, ~0.1 ms for a launch and a few small ops on the GPU machine's host, would
otherwise hide the smaller kernels' time).

    python bench/bench_row_stride.py [--shape 130m] [--sweep-conv]

`--sweep-conv` times the conv's tiles in the layout the mixer runs it (padded rows): its x
channels and its B|C channels as two launches, as kernels.mixer_body does, and the whole x|B|C
slice as one.
"""

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import graph_ms  # noqa: E402
from kernels.triton_conv.conv1d import conv1d_bwd, conv1d_fwd  # noqa: E402
from kernels.triton_norm.rmsnorm import rmsnorm_gated_bwd, rmsnorm_gated_fwd  # noqa: E402

# name: (batch, seqlen, d_inner, nheads, ngroups · d_state) at bench_train.py's micro-batch
# (1.3b-tp2: a TP=2 rank of bench_parallel's 1.3b with ngroups 2, half the heads and one
# group; 1.3b-cp2: a CP=2 rank, half of each row)
SHAPES = {"130m": (16, 2048, 1536, 24, 128), "1.3b": (4, 2048, 4096, 64, 128), "1.3b-tp2": (4, 2048, 2048, 32, 128),
          "1.3b-cp2": (4, 1024, 4096, 64, 128)}


def kernel_times(b, l, d_inner, bc, width):
    """{kernel: ms} on the column slices of a (b, l, width) buffer."""
    conv_dim = d_inner + 2 * bc
    buf = torch.randn(b, l, width, device="cuda", dtype=torch.bfloat16)
    grad = torch.empty_like(buf)
    z, xBC = buf[..., :d_inner], buf[..., d_inner:d_inner + conv_dim]
    dz, dxBC = grad[..., :d_inner], grad[..., d_inner:d_inner + conv_dim]
    weight = torch.randn(conv_dim, 4, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(conv_dim, device="cuda", dtype=torch.bfloat16)
    dconv = torch.randn(b, l, conv_dim, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(b * l, d_inner, device="cuda", dtype=torch.bfloat16)
    dnormed = torch.randn_like(y)
    norm_weight = torch.ones(d_inner, device="cuda")
    z_rows, dz_rows = z.reshape(b * l, d_inner), dz.reshape(b * l, d_inner)
    assert z_rows.data_ptr() == z.data_ptr() and dz_rows.stride(0) == width, "row views, not copies"
    return {
        "conv fwd (x|B|C)": graph_ms(lambda: conv1d_fwd(xBC, weight, bias)),
        "conv bwd (dx into the slice)": graph_ms(lambda: conv1d_bwd(dconv, None, xBC, weight, bias, dx_out=dxBC)),
        "gated norm fwd (z)": graph_ms(lambda: rmsnorm_gated_fwd(y, z_rows, norm_weight, 1e-5, d_inner)),
        "gated norm bwd (dz into the slice)": graph_ms(
            lambda: rmsnorm_gated_bwd(dnormed, y, z_rows, norm_weight, 1e-5, d_inner, dz_out=dz_rows)),
    }


FWD_TILES = [(32, 64, 4), (16, 64, 4), (64, 64, 4), (16, 128, 4), (32, 128, 4), (32, 128, 8), (64, 128, 8),
             (16, 256, 8)]
BWD_TILES = [(4, 128, 4, 64), (4, 128, 4, 32), (4, 128, 4, 16), (4, 128, 4, 8), (2, 256, 4, 64), (8, 64, 4, 64),
             (4, 64, 2, 64), (2, 128, 2, 64), (4, 128, 4, 128), (2, 128, 2, 128)]


def sweep_conv(b, l, d_inner, bc, width):
    """ms of the conv's forward and backward per tile setting, on the x, B|C and x|B|C slices."""
    conv_dim = d_inner + 2 * bc
    buf = torch.randn(b, l, width, device="cuda", dtype=torch.bfloat16)
    grad = torch.empty_like(buf)
    weight = torch.randn(conv_dim, 4, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(conv_dim, device="cuda", dtype=torch.bfloat16)
    # name: (input slice, dx slice, weight rows, bias rows, output gradient), by buffer columns
    parts = {}
    for name, (start, stop) in {"x": (d_inner, 2 * d_inner), "B|C": (2 * d_inner, 2 * d_inner + 2 * bc),
                                "x|B|C": (d_inner, d_inner + conv_dim)}.items():
        channels = slice(start - d_inner, stop - d_inner)
        parts[name] = (buf[..., start:stop], grad[..., start:stop], weight[channels], bias[channels],
                       torch.randn(b, l, stop - start, device="cuda", dtype=torch.bfloat16))
    print("  forward (block_l, block_d, warps): " + "  ".join(parts))
    for tile in FWD_TILES:
        ms = [graph_ms(lambda: conv1d_fwd(xs, w, bs, block_l=tile[0], block_d=tile[1], num_warps=tile[2]))
              for xs, _, w, bs, _ in parts.values()]
        print(f"  {str(tile):22s} " + "  ".join(f"{t:7.3f}" for t in ms))
    print("  backward (block_l, block_d, warps, steps): " + "  ".join(parts))
    for tile in BWD_TILES:
        ms = [graph_ms(lambda: conv1d_bwd(dout, None, xs, w, bs, block_l=tile[0], block_d=tile[1], num_warps=tile[2],
                                          steps=tile[3], dx_out=dxs))
              for xs, dxs, w, bs, dout in parts.values()]
        print(f"  {str(tile):22s} " + "  ".join(f"{t:7.3f}" for t in ms))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="*", default=["130m", "1.3b"], choices=list(SHAPES))
    parser.add_argument("--sweep-conv", action="store_true", help="the conv's tiles in the mixer's layout")
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()}, triton {triton.__version__}, bf16, ms (CUDA-graph replay, median)")
    for name in args.shape:
        b, l, d_inner, nheads, bc = SHAPES[name]
        width = 2 * d_inner + 2 * bc + nheads
        padded = -(-width // 16) * 16
        widths = [width] if padded == width else [width, padded]
        if args.sweep_conv:
            print(f"## {name}: b{b} L{l}, row stride {padded}, ms")
            sweep_conv(b, l, d_inner, bc, padded)
            continue
        times = [kernel_times(b, l, d_inner, bc, w) for w in widths]
        print(f"## {name}: b{b} L{l}, row stride " + " vs ".join(str(w) for w in widths))
        for kernel in times[0]:
            row = "  ".join(f"{t[kernel]:8.3f}" for t in times)
            print(f"  {kernel:36s} {row}")


if __name__ == "__main__":
    main()
