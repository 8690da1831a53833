"""SSD speed: ours (kernels.ssd) beside mamba_ssm's `mamba_chunk_scan_combined` and torch's causal SDPA.

bf16, `triton.testing.do_bench` medians, forward and forward+backward, at the shapes of
issue 4; then the same calls replayed from a CUDA graph (`do_bench_cudagraph`), which times
the kernels alone: do_bench's figure for a many-kernel op also holds the CPU's launch time
when that is longer than the kernels' (mamba_ssm's backward at b4 L2048 h64: ~2.7 ms of CPU
for ~1.2 ms of kernels), while inside a training step that CPU time overlaps earlier work.
The floor of each row is max(FLOPs / measured bf16 matmul peak, bytes / measured
copy bandwidth) (METHOD.md); "ours %" is floor / ours. Writes bench/results/ssd-<gpu>.json.

    PYTHONPATH=.anchor python bench/bench_ssd.py [--shapes b8_L2048_h32 ...] [--chunk-size 256]
    (where an eager call's CPU time goes: bench/bench_launch.py)

mamba_ssm is optional: without it its columns are empty (null in the JSON).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import bench_ms, copy_bandwidth, fwd_fwdbwd_ms, graph_ms, results_path  # noqa: E402
from kernels.triton_ssd import ssd_triton  # noqa: E402
from mamba_train.train.metrics import measured_matmul_peak  # noqa: E402

# name: (batch, seqlen, nheads, headdim, ngroups, dstate)
SHAPES = {
    "b8_L2048_h32": (8, 2048, 32, 64, 1, 128),
    "b4_L2048_h64": (4, 2048, 64, 64, 1, 128),
    "b2_L8192_h32": (2, 8192, 32, 64, 1, 128),
    "b1_L16384_h64": (1, 16384, 64, 64, 1, 128),
}


def ssd_cost(b, l, h, p, g, n, chunk_size):
    """(FLOPs, bytes) of the forward and of forward+backward, the fewest any chunked SSD needs.

    Forward per token: chunk state and off-diagonal output 2·(2·h·p·n); diagonal block, causal
    half of the chunk, h·p·Q for the scores·x and g·n·Q for C·Bᵀ. The backward does about
    twice the forward's matrix work (each product's two operand gradients): fwd+bwd = 3×.
    Bytes: inputs x, dt, B, C read and y written once forward; backward reads them and dy
    and writes one gradient per input.
    """
    flops_fwd = b * l * (4 * h * p * n + h * p * chunk_size + g * n * chunk_size)
    inputs = b * l * (h * p + h + 2 * g * n) * 2
    out = b * l * h * p * 2
    return (flops_fwd, inputs + out), (3 * flops_fwd, inputs + out + (inputs + out) + inputs)


def make_ssd_inputs(b, l, h, p, g, n):
    x = torch.randn(b, l, h, p, device="cuda", dtype=torch.bfloat16)
    dt = (torch.randn(b, l, h, device="cuda") * 0.5 - 1).to(torch.bfloat16)
    A = -torch.empty(h, device="cuda").uniform_(1, 16)
    B = torch.randn(b, l, g, n, device="cuda", dtype=torch.bfloat16) * n ** -0.5
    C = torch.randn(b, l, g, n, device="cuda", dtype=torch.bfloat16) * n ** -0.5
    D = torch.ones(h, device="cuda")
    dt_bias = torch.randn(h, device="cuda") * 0.5
    leaves = [x, dt, A, B, C, D, dt_bias]
    for t in leaves:
        t.requires_grad_(True)
    return dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias), leaves


def time_ssd(fn, inputs, leaves, chunk_size, timer=bench_ms):
    """(forward ms, forward+backward ms) of fn under `timer` (bench_ms or graph_ms); with
    graph_ms (None, None) when the anchor cannot be captured in a CUDA graph."""
    def forward():
        return fn(**inputs, chunk_size=chunk_size, dt_softplus=True)

    return fwd_fwdbwd_ms(forward, torch.randn_like(inputs["x"]), leaves, timer, getattr(fn, "__name__", str(fn)),
                         may_fail=fn is not ssd_triton)


def time_sdpa(b, l, h, p):
    q, k, v = (torch.randn(b, h, l, p, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        fwd = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    dy = torch.randn_like(q)
    fwdbwd = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dy),
                      grad_to_none=[q, k, v])
    return fwd, fwdbwd


def anchor_fn():
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as err:  # noqa: BLE001 - report and carry on without the anchor
        print(f"mamba_ssm not importable ({err!r}): its columns stay empty", file=sys.stderr)
        return None
    return mamba_chunk_scan_combined


def profile(shape, chunk_size, anchor):
    """Per-kernel CUDA time of one forward+backward (where the time goes, stage by stage)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    inputs, leaves = make_ssd_inputs(*shape)
    dy = torch.randn_like(inputs["x"])
    for label, fn in (("ours", ssd_triton), ("mamba_ssm", anchor)):
        if fn is None:
            continue
        for _ in range(3):   # compile and warm up outside the profile
            fn(**inputs, chunk_size=chunk_size, dt_softplus=True).backward(dy)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn(**inputs, chunk_size=chunk_size, dt_softplus=True).backward(dy)
            torch.cuda.synchronize()
        print(f"# {label}: {shape}, chunk {chunk_size}, per-kernel CUDA time over 5 forward+backward")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


def fmt(ms):
    return "   -   " if ms is None else f"{ms:7.3f}"


def ratio(anchor_ms, ours_ms):
    return "  -  " if anchor_ms is None or ours_ms is None else f"{anchor_ms / ours_ms:5.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--no-anchor", action="store_true")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/ssd-<gpu>.json)")
    parser.add_argument("--profile", action="store_true",
                        help="only print the per-kernel time of one forward+backward at the first shape")
    args = parser.parse_args()
    if args.profile:
        return profile(SHAPES[args.shapes[0]], args.chunk_size, None if args.no_anchor else anchor_fn())

    gpu = torch.cuda.get_device_name()
    peak_flops, copy_bw = measured_matmul_peak(torch.device("cuda")), copy_bandwidth(4 << 30)
    anchor = None if args.no_anchor else anchor_fn()
    print(f"# SSD, bf16, chunk {args.chunk_size}, {gpu}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"# measured: bf16 matmul {peak_flops / 1e12:.0f} TFLOP/s, copy {copy_bw / 1e12:.2f} TB/s (read+write)")
    header = (f"{'shape':16s} | {'floor':>7s} {'ours':>7s} {'%floor':>6s} {'mamba':>7s} {'x':>5s} {'sdpa':>7s} | "
              f"{'floor':>7s} {'ours':>7s} {'%floor':>6s} {'mamba':>7s} {'x':>5s} {'sdpa':>7s} {'x':>5s}")
    print(f"{'':16s} | {'forward (ms)':^48s} | {'forward+backward (ms)':^56s}")
    print(header)
    out = Path(args.out) if args.out else results_path("ssd", gpu)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.shapes:
        b, l, h, p, g, n = SHAPES[name]
        (fl_f, by_f), (fl_fb, by_fb) = ssd_cost(b, l, h, p, g, n, args.chunk_size)
        floor_f = max(fl_f / peak_flops, by_f / copy_bw) * 1e3
        floor_fb = max(fl_fb / peak_flops, by_fb / copy_bw) * 1e3
        inputs, leaves = make_ssd_inputs(b, l, h, p, g, n)
        ours_f, ours_fb = time_ssd(ssd_triton, inputs, leaves, args.chunk_size)
        ours_gf, ours_gfb = time_ssd(ssd_triton, inputs, leaves, args.chunk_size, timer=graph_ms)
        anc_f = anc_fb = anc_gf = anc_gfb = None
        if anchor is not None:
            anc_f, anc_fb = time_ssd(anchor, inputs, leaves, args.chunk_size)
            anc_gf, anc_gfb = time_ssd(anchor, inputs, leaves, args.chunk_size, timer=graph_ms)
        del inputs, leaves
        sdpa_f, sdpa_fb = time_sdpa(b, l, h, p)
        torch.cuda.empty_cache()
        print(f"{name:16s} | {floor_f:7.3f} {ours_f:7.3f} {100 * floor_f / ours_f:5.0f}% {fmt(anc_f)} "
              f"{ratio(anc_f, ours_f)} {sdpa_f:7.3f} | {floor_fb:7.3f} {ours_fb:7.3f} {100 * floor_fb / ours_fb:5.0f}% {fmt(anc_fb)} "
              f"{ratio(anc_fb, ours_fb)} {sdpa_fb:7.3f} {sdpa_fb / ours_fb:5.2f}", flush=True)
        rows.append(dict(shape=f"{name}_p{p}_g{g}_n{n}", gpu=gpu, chunk_size=args.chunk_size,
                         ours_fwd_ms=ours_f, ours_fwdbwd_ms=ours_fb, anchor_fwd_ms=anc_f, anchor_fwdbwd_ms=anc_fb,
                         sdpa_fwd_ms=sdpa_f, sdpa_fwdbwd_ms=sdpa_fb, floor_fwd_ms=floor_f, floor_fwdbwd_ms=floor_fb,
                         ours_fwd_graph_ms=ours_gf, ours_fwdbwd_graph_ms=ours_gfb,
                         anchor_fwd_graph_ms=anc_gf, anchor_fwdbwd_graph_ms=anc_gfb))
        out.write_text(json.dumps(rows, indent=1) + "\n")   # after each row: a cut-off run keeps what it has
    print("# kernels alone (CUDA graph replay), ms: ours and mamba_ssm, and mamba / ours")
    print(f"{'shape':16s} | {'fwd ours':>8s} {'mamba':>7s} {'x':>5s} | {'f+b ours':>8s} {'mamba':>7s} {'x':>5s}")
    for row, name in zip(rows, args.shapes):
        print(f"{name:16s} | {fmt(row['ours_fwd_graph_ms']):>8s} {fmt(row['anchor_fwd_graph_ms'])} "
              f"{ratio(row['anchor_fwd_graph_ms'], row['ours_fwd_graph_ms'])} | "
              f"{fmt(row['ours_fwdbwd_graph_ms']):>8s} {fmt(row['anchor_fwdbwd_graph_ms'])} "
              f"{ratio(row['anchor_fwdbwd_graph_ms'], row['ours_fwdbwd_graph_ms'])}")
    print("# x: speed-up of ours over mamba_ssm (mamba / ours) and, last column, over SDPA")
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
