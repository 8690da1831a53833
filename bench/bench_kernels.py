"""conv1d and gated RMSNorm speed: ours beside the anchors and the torch reference, as % of copy bandwidth.

bf16, `triton.testing.do_bench` medians, forward and forward+backward, at the model's shapes
(b8 L2048): the conv over xBC, dim 2·d_inner + 2·ngroups·d_state for d_model 768 and 2048
(3328 and 8448 channels), width 4, SiLU, bias; the gated norm over d_inner (1536 and 4096),
one group, z gate. Anchors: causal_conv1d's `causal_conv1d_fn` (channels-last) and mamba_ssm's
`rmsnorm_fn(norm_before_gate=False)`, each "n/a" when not importable.

Both ops are bandwidth-bound, so the yardstick is a device copy moving the same bytes:
conv forward reads x and writes y, backward reads dy and x and writes dx; the norm forward
reads x, z and writes y, backward reads dy, x, z and writes dx, dz (weights counted, tiny).
"% bw" is (bytes / our time) / (bytes / copy time). Issue 4's goal: ≥ 70%.

Each op is timed twice: as called (`do_bench`), and replayed from a CUDA graph
(`bench.common.graph_ms`), the kernels alone. An eager forward+backward here is a few launches
and small torch ops for 0.1–0.7 ms of kernels, and on a host with a slow CPU do_bench then times
the CPU (fourteenth session: the norm's forward+backward, ours and mamba_ssm's alike, 0.73–0.79
ms in do_bench); inside a training step that CPU time overlaps other kernels, or a graph replays
the step. The sweeps time the kernels alone.

    PYTHONPATH=.anchor python bench/bench_kernels.py [--ops conv norm] [--sweep]

Writes bench/results/kernels-<gpu>.json. `--sweep` instead times our conv kernels at a few
tile configurations (kernels/triton_conv/conv1d.py's FWD_* and BWD_* constants), `--sweep-norm`
our gated norm's backward (kernels/triton_norm/rmsnorm.py's `_blocks`).
"""

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import bench_ms, copy_bandwidth, fwd_fwdbwd_ms, graph_ms, results_path  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.triton_conv import causal_conv1d_triton  # noqa: E402
from kernels.triton_conv import conv1d as conv_stage  # noqa: E402
from kernels.triton_norm import rmsnorm as norm_stage  # noqa: E402
from kernels.triton_norm import rmsnorm_gated_triton  # noqa: E402

# name: (batch, seqlen, dim, width) — dim = 2·d_inner + 2·128 for d_model 768 and 2048
CONV_SHAPES = {"b8_L2048_d3328_w4": (8, 2048, 3328, 4), "b8_L2048_d8448_w4": (8, 2048, 8448, 4)}
# name: (batch, seqlen, dim, group_size) — dim = d_inner, ngroups = 1
NORM_SHAPES = {"b8_L2048_d1536_g1536": (8, 2048, 1536, 1536), "b8_L2048_d4096_g4096": (8, 2048, 4096, 4096)}
BF16 = torch.bfloat16


def time_fwd_fwdbwd(fn, leaves, dout, timer=bench_ms, may_fail=False):
    """(forward ms, forward+backward ms) of fn() -> tensor under `timer`, or (None, None)
    without fn (an anchor not installed here) or, with may_fail, where it cannot be captured."""
    return (None, None) if fn is None else fwd_fwdbwd_ms(fn, dout, leaves, timer, may_fail=may_fail)


def time_both(fn, leaves, dout, anchor=False):
    """{"eager": (forward, forward+backward) as called, "graph": the same replayed from a CUDA
    graph}; an anchor's graph timing may fail (None, None)."""
    return {"eager": time_fwd_fwdbwd(fn, leaves, dout),
            "graph": time_fwd_fwdbwd(fn, leaves, dout, graph_ms, may_fail=anchor)}


def leaf(t):
    return t.detach().requires_grad_(True)


def load_anchor(module, name):
    """`module.name`, the anchor's op, or None (its columns read n/a) where it is not installed here."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as err:  # noqa: BLE001 - any import failure means the anchor is not installed here
        print(f"{module} not importable ({err!r}): its columns read n/a", file=sys.stderr)
        return None


def bench_conv(shape, anchor):
    b, l, d, w = shape
    x, weight, bias = leaf(torch.randn(b, l, d, device="cuda", dtype=BF16)), \
        leaf(torch.randn(d, w, device="cuda", dtype=BF16) * 0.5), leaf(torch.randn(d, device="cuda", dtype=BF16))
    dout, leaves = torch.randn_like(x), [x, weight, bias]
    act = b * l * d * 2
    nbytes = (2 * act + d * (w + 1) * 2, 5 * act + 3 * d * (w + 1) * 2)   # weight and bias: read, + grads
    times = {
        "ours": time_both(lambda: causal_conv1d_triton(x, weight, bias, activation="silu"), leaves, dout),
        # causal_conv1d takes (batch, dim, seqlen); a transposed channels-last tensor selects its
        # channels-last kernel
        "anchor": time_both(anchor and (lambda: anchor(x.transpose(1, 2), weight, bias, activation="silu")
                                        .transpose(1, 2)), leaves, dout, anchor=True),
        "torch": time_fwd_fwdbwd(lambda: reference.causal_conv1d(x, weight, bias, activation="silu"), leaves, dout),
    }
    return times, nbytes


def bench_norm(shape, anchor):
    b, l, d, group = shape
    x, z = leaf(torch.randn(b, l, d, device="cuda", dtype=BF16)), leaf(torch.randn(b, l, d, device="cuda", dtype=BF16))
    weight = leaf(1 + 0.1 * torch.randn(d, device="cuda", dtype=BF16))
    dout, leaves = torch.randn_like(x), [x, z, weight]
    act = b * l * d * 2
    nbytes = (3 * act + d * 2, 8 * act + 3 * d * 2)
    times = {
        "ours": time_both(lambda: rmsnorm_gated_triton(x, z, weight, eps=1e-5, group_size=group), leaves, dout),
        "anchor": time_both(anchor and (lambda: anchor(x, weight, None, z=z, eps=1e-5, group_size=group,
                                                       norm_before_gate=False)), leaves, dout, anchor=True),
        "torch": time_fwd_fwdbwd(lambda: reference.rmsnorm_gated(x, z, weight, eps=1e-5, group_size=group),
                                 leaves, dout),
    }
    return times, nbytes


def sweep(shape):
    """Our conv kernels alone (forward; backward without the forward) at a few tile configurations,
    replayed from a CUDA graph."""
    b, l, d, w = shape
    x, weight, bias = (torch.randn(b, l, d, device="cuda", dtype=BF16), torch.randn(d, w, device="cuda", dtype=BF16),
                       torch.randn(d, device="cuda", dtype=BF16))
    dout, act = torch.randn_like(x), b * l * d * 2
    bw = copy_bandwidth(3 * act)
    print(f"# conv tiles at {shape}, bf16; copy {bw / 1e9:.0f} GB/s; config: ms, % of copy bw")
    for cfg in [(32, 64, 4), (64, 64, 8), (64, 64, 4), (64, 128, 8), (128, 64, 16)]:   # the default first
        ms = graph_ms(lambda: conv_stage.conv1d_fwd(x, weight, bias, block_l=cfg[0], block_d=cfg[1], num_warps=cfg[2]))
        print(f"fwd {cfg}: {ms:.3f} ms, {100 * 2 * act / (ms * 1e-3) / bw:.0f}%")
    # (tile rows, channels, warps, steps a program walks): the default first; then fewer / more
    # steps (stretch-end work and dweight partials against programs per wave), 256- and 64-thread
    # CTAs (16 / 18 warps per SM), 8 values a thread (16-byte loads, 208 registers), 512 B rows,
    # and one-row tiles of 1 KB (no cross-warp reduction); 128 steps (half the stretch-end work,
    # half the programs) and 64-channel tiles at 2 warps (twice the programs)
    for cfg in [(4, 128, 4, 64), (4, 128, 4, 32), (4, 128, 4, 16), (8, 128, 8, 32), (2, 128, 2, 32),
                (8, 128, 4, 16), (2, 256, 4, 32), (1, 512, 4, 64), (4, 128, 4, 128), (2, 128, 2, 128),
                (4, 64, 2, 64), (4, 64, 2, 128)]:
        ms = graph_ms(lambda: conv_stage.conv1d_bwd(dout, None, x, weight, bias, block_l=cfg[0], block_d=cfg[1],
                                                    num_warps=cfg[2], steps=cfg[3]))
        print(f"bwd {cfg}: {ms:.3f} ms, {100 * 3 * act / (ms * 1e-3) / bw:.0f}%")


def sweep_norm(shape):
    """Our gated norm's backward alone at a few (block_m, num_warps, tiles) settings, replayed from a
    CUDA graph; the default first."""
    b, l, d, group = shape
    x, z, dout = (torch.randn(b * l, d, device="cuda", dtype=BF16) for _ in range(3))
    weight = torch.ones(d, device="cuda", dtype=torch.float32)
    act = b * l * d * 2
    bw = copy_bandwidth(5 * act)
    print(f"# norm backward at {shape}, bf16 (fp32 weight); copy {bw / 1e9:.0f} GB/s; config: ms, % of copy bw")
    for cfg in [(None, None, None), (1, 4, None), (1, 8, None), (1, 16, None), (2, 8, None), (4, 8, None),
                (1, 8, 4), (1, 8, 64), (2, 16, 4)]:
        ms = graph_ms(lambda: norm_stage.rmsnorm_gated_bwd(dout, x, z, weight, 1e-5, group, *cfg))
        print(f"bwd {cfg}: {ms:.3f} ms, {100 * 5 * act / (ms * 1e-3) / bw:.0f}%")


def fmt(ms):
    return "    n/a" if ms is None else f"{ms:7.3f}"


def fmt_pct(pct):
    return "  n/a" if pct is None else f"{pct:4.0f}%"


def pct_bw(nbytes, ms, copy_bw):
    """Our bytes/s as % of a copy's moving as many bytes (None without a time)."""
    return None if ms is None else 100 * nbytes / (ms * 1e-3) / copy_bw


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="*", default=["conv", "norm"], choices=["conv", "norm"])
    parser.add_argument("--sweep", action="store_true", help="only time our conv at a few tile configurations")
    parser.add_argument("--sweep-norm", action="store_true", help="only time our norm backward at a few settings")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/kernels-<gpu>.json)")
    args = parser.parse_args()
    if args.sweep:
        for shape in CONV_SHAPES.values():
            sweep(shape)
        return None
    if args.sweep_norm:
        for shape in NORM_SHAPES.values():
            sweep_norm(shape)
        return None

    gpu = torch.cuda.get_device_name()
    out = Path(args.out) if args.out else results_path("kernels", gpu)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"# conv1d (width 4, SiLU, bias) and gated RMSNorm (one group), bf16, {gpu}, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    print("# anchors: conv causal_conv1d_fn (channels-last), norm mamba_ssm rmsnorm_fn(norm_before_gate=False)")
    print(f"{'':27s} | {'forward (ms)':^36s} | {'forward+backward (ms)':^36s}")
    print(f"{'op  shape':27s} | {'ours':>7s} {'anchor':>7s} {'torch':>7s} {'MB':>6s} {'% bw':>5s} | "
          f"{'ours':>7s} {'anchor':>7s} {'torch':>7s} {'MB':>6s} {'% bw':>5s}")
    rows = []
    for op in args.ops:
        shapes, run, anchor = ((CONV_SHAPES, bench_conv, load_anchor("causal_conv1d", "causal_conv1d_fn"))
                               if op == "conv" else
                               (NORM_SHAPES, bench_norm, load_anchor("mamba_ssm.ops.triton.layernorm_gated", "rmsnorm_fn")))
        for name, shape in shapes.items():
            times, (bytes_fwd, bytes_fwdbwd) = run(shape, anchor)
            bw_fwd, bw_fwdbwd = copy_bandwidth(bytes_fwd), copy_bandwidth(bytes_fwdbwd)
            (ours_f, ours_fb), (anc_f, anc_fb) = times["ours"]["eager"], times["anchor"]["eager"]
            (ours_gf, ours_gfb), (anc_gf, anc_gfb) = times["ours"]["graph"], times["anchor"]["graph"]
            ref_f, ref_fb = times["torch"]
            pct_f, pct_fb = pct_bw(bytes_fwd, ours_f, bw_fwd), pct_bw(bytes_fwdbwd, ours_fb, bw_fwdbwd)
            pct_gf, pct_gfb = pct_bw(bytes_fwd, ours_gf, bw_fwd), pct_bw(bytes_fwdbwd, ours_gfb, bw_fwdbwd)
            print(f"{op:5s}{name:22s} | {ours_f:7.3f} {fmt(anc_f)} {ref_f:7.3f} {bytes_fwd / 1e6:6.0f} {pct_f:4.0f}% | "
                  f"{ours_fb:7.3f} {fmt(anc_fb)} {ref_fb:7.3f} {bytes_fwdbwd / 1e6:6.0f} {pct_fb:4.0f}%")
            rows.append(dict(op=op, shape=name, gpu=gpu, ours_fwd_ms=ours_f, ours_fwdbwd_ms=ours_fb,
                             anchor_fwd_ms=anc_f, anchor_fwdbwd_ms=anc_fb, torch_fwd_ms=ref_f, torch_fwdbwd_ms=ref_fb,
                             bytes_fwd=bytes_fwd, bytes_fwdbwd=bytes_fwdbwd, copy_bw_gbs=bw_fwd / 1e9,
                             copy_bw_fwdbwd_gbs=bw_fwdbwd / 1e9, ours_fwd_pct_bw=pct_f, ours_fwdbwd_pct_bw=pct_fb,
                             ours_fwd_graph_ms=ours_gf, ours_fwdbwd_graph_ms=ours_gfb, anchor_fwd_graph_ms=anc_gf,
                             anchor_fwdbwd_graph_ms=anc_gfb, ours_fwd_graph_pct_bw=pct_gf,
                             ours_fwdbwd_graph_pct_bw=pct_gfb))
            out.write_text(json.dumps(rows, indent=1) + "\n")   # after each row: a cut-off run keeps what it has
            torch.cuda.empty_cache()
    print("# MB: bytes the op must move; % bw: our bytes/s over a device copy's moving as many bytes "
          "(copy_bw_gbs: forward's, copy_bw_fwdbwd_gbs: forward+backward's)")
    print("# kernels alone (CUDA graph replay), ms and % bw: ours, and the anchor's")
    print(f"{'op  shape':27s} | {'fwd':>7s} {'% bw':>5s} {'anchor':>7s} | {'f+b':>7s} {'% bw':>5s} {'anchor':>7s}")
    for row in rows:
        print(f"{row['op']:5s}{row['shape']:22s} | {fmt(row['ours_fwd_graph_ms'])} {fmt_pct(row['ours_fwd_graph_pct_bw'])} "
              f"{fmt(row['anchor_fwd_graph_ms'])} | {fmt(row['ours_fwdbwd_graph_ms'])} "
              f"{fmt_pct(row['ours_fwdbwd_graph_pct_bw'])} {fmt(row['anchor_fwdbwd_graph_ms'])}")
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
