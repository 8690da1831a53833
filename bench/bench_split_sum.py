"""The sum of the SSD backward's head-split partials (kernels/triton_ssd/split_sum.py) against
torch's `partials.sum(0)` and its cast into the output, which it replaced, at the 1.3b step's
shapes (micro 4 × 2048, chunks of 256, d_state 128): bmm_bwd_dcb's dcb on one GPU (2 groups,
2 splits) and on a TP=2 rank (1 group, 4 splits), and a TP rank's dB (2 splits, bf16, written
into its half of the conv's gradient). Then the backward kernels' partial rows of a weight's
gradient (kernels/column_sum.py) against torch's `partials.sum(0)` and its cast, at a CP=2
rank's shapes (micro 4 × 1024 of 1.3b, ngroups 2): the gated norm's and the block norm's
dweight, the conv's dweight (into the (d, width) weight) and dbias, bf16 as the parallel
trainer's weights. Medians from a CUDA graph (bench.common.graph_ms).

    source bench/device_env.sh; python3 bench/bench_split_sum.py
"""

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import graph_ms  # noqa: E402
from kernels.column_sum import column_sum  # noqa: E402
from kernels.triton_ssd.split_sum import split_sum  # noqa: E402

B, L, CHUNK, N = 4, 2048, 256, 128


def dcb(splits, groups):
    """bmm_bwd_dcb's partials and its contiguous fp32 output."""
    return (torch.randn(splits, B, L // CHUNK, groups, CHUNK, CHUNK, device="cuda"),
            torch.empty(B, L // CHUNK, groups, CHUNK, CHUNK, device="cuda"))


def cases():
    """name -> (partials, output): fp32 partials and the tensor their sum goes into."""
    conv_grad = torch.empty(B, L, 2048 + 2 * N, device="cuda", dtype=torch.bfloat16)   # x | B | C of a TP rank
    dB = conv_grad[..., 2048:2048 + N].view(B, L, 1, N)
    return {"dcb, one GPU (2 splits x 2 groups)": dcb(2, 2), "dcb, TP=2 rank (4 splits x 1 group)": dcb(4, 1),
            "dB, TP=2 rank (2 splits, bf16, strided)": (torch.randn(2, B, L, 1, N, device="cuda"), dB)}


def column_cases():
    """name -> (partials, output, torch's way to fill the output)."""
    conv_dim, width, conv_rows = 4096 + 2 * 2 * N, 4, 32     # [x | B | C] channels; b × programs partial rows
    norm_gated, norm_block = torch.randn(256, 4096, device="cuda"), torch.randn(512, 2048, device="cuda")
    conv_w, conv_b = torch.randn(conv_rows, width, conv_dim, device="cuda"), torch.randn(conv_rows, conv_dim,
                                                                                          device="cuda")
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    weight = torch.empty(conv_dim, width, **bf16)
    return {"gated norm dweight (256 x 4096 -> bf16)": (norm_gated, torch.empty(4096, **bf16), None),
            "block norm dweight (512 x 2048 -> bf16)": (norm_block, torch.empty(2048, **bf16), None),
            "conv dweight (32 x 4 x 4608 -> (4608, 4) bf16)": (conv_w, weight.t(), weight),
            "conv dbias (32 x 4608 -> bf16)": (conv_b, torch.empty(conv_dim, **bf16), None)}


def main():
    print(f"# {torch.cuda.get_device_name()}, triton {triton.__version__}, ms (CUDA-graph replay, median)")
    print(f"{'partials':42s} {'MiB':>6s} {'torch':>8s} {'ours':>8s} {'GB/s ours':>10s}")
    for name, (partials, out) in cases().items():
        torch_ms = graph_ms(lambda: out.copy_(partials.sum(0)))
        ours_ms = graph_ms(lambda: split_sum(partials, out))
        moved = partials.numel() * 4 + out.numel() * out.element_size()
        print(f"{name:42s} {partials.numel() * 4 / 2**20:6.0f} {torch_ms:8.4f} {ours_ms:8.4f} "
              f"{moved / ours_ms / 1e6:10.0f}")
    print(f"{'column sums':46s} {'MiB':>6s} {'torch':>8s} {'ours':>8s}")
    for name, (partials, out, whole) in column_cases().items():
        if whole is None:
            torch_ms = graph_ms(lambda: out.copy_(partials.sum(0)))
        else:   # as conv1d_bwd did: the sum, transposed, cast into a new weight-shaped tensor
            torch_ms = graph_ms(lambda: whole.copy_(partials.sum(0).t()))
        ours_ms = graph_ms(lambda: column_sum(partials, out))
        print(f"{name:46s} {partials.numel() * 4 / 2**20:6.2f} {torch_ms:8.4f} {ours_ms:8.4f}")


if __name__ == "__main__":
    main()
