"""Where the SSD time goes: each Triton stage timed alone (do_bench median), forward and backward.

    python bench/profile_ssd.py [--shape b8_L2048_h32] [--chunk-sizes 256 128] [--tiles 64 128]
    python bench/profile_ssd.py --sweep [--shape ...] [--chunk-sizes 256] [--tiles 64]
                                [--launchers bmm_bwd_dcb ...] [--heads-per-program 16 8 4]
                                [--tile-dstate 128] [--block-h 1 2 4 8] [--tile-k 32]
                                [--heads-fastest] [--around-shipped]   (only those values, on top of the shipped settings)

Without `--tiles` each launcher runs its shipped settings (`launch.SETTINGS`); `--tiles` caps
the tile edge every launcher picks instead (each cap a column, overriding tile_dstate / tile_k
too). The table shows, per stage, the milliseconds of one call and its share of the total, and the
end-to-end forward and forward+backward of `ssd_triton` for comparison (launch gaps and the
small torch ops between stages are the difference). `--sweep` times each launcher over tile
caps, num_warps and num_stages and prints the `kernels.triton_ssd.launch.SETTINGS` to keep.
"""

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_ssd import SHAPES, make_ssd_inputs  # noqa: E402
from bench.common import bench_ms  # noqa: E402
from kernels.triton_ssd import bmm, chunk_cumsum, chunk_scan, chunk_state, combined, launch  # noqa: E402
from kernels.triton_ssd import state_passing  # noqa: E402

_DEFAULT_BLOCK = launch.block
# the SSD of each bench_train.py model's layer at its micro-batch (issue 9): 130m, 370m, 1.3b
TRAINING_SHAPES = {"b16_L2048_h24": (16, 2048, 24, 64, 1, 128), "b8_L2048_h32": SHAPES["b8_L2048_h32"],
                   "b4_L2048_h64": SHAPES["b4_L2048_h64"],
                   # bench/device_parallel.sh's 1.3b (ngroups 2) on one GPU, and on one rank of TP=2
                   "b4_L2048_h64_g2": (4, 2048, 64, 64, 2, 128), "b4_L2048_h32": (4, 2048, 32, 64, 1, 128)}
ALL_SHAPES = {**SHAPES, **TRAINING_SHAPES}
# rows timed for comparison, not in the sums: the two stages each fused state passing fuses
# (context parallelism, and grids too small for the fused kernels, run them apart), and
# chunk_scan_fwd on the fp32 CB the backward uses (the forward's is in C's dtype)
CB_FP32_ROW = "chunk_scan_fwd, fp32 CB"   # a row, not a launcher: --sweep skips it
COMPARISON_ROWS = ("chunk_state_fwd", "state_passing_fwd", CB_FP32_ROW, "chunk_scan_bwd_dstates", "state_passing_bwd")


def cap_tiles(cap):
    """Every tile edge capped at `cap`, or (None) the launchers' own settings again."""
    launch.block = _DEFAULT_BLOCK if cap is None else (lambda dim, cap_=None: _DEFAULT_BLOCK(dim, cap))


def stage_calls(shape, chunk_size):
    """{launcher name: a call of it on real intermediates}, and the end-to-end forward and backward."""
    inputs, _ = make_ssd_inputs(*shape)
    x, dt, A, B, C, D, dt_bias = (inputs[k].detach() for k in ("x", "dt", "A", "B", "C", "D", "dt_bias"))
    l = x.shape[1]
    dt_out, dA_cumsum = chunk_cumsum.chunk_cumsum_fwd(dt, A, chunk_size, dt_bias, True)
    states = chunk_state.chunk_state_fwd(B, x, dt_out, dA_cumsum)
    # in C's dtype, as the forward writes and keeps them for backward
    states_in, _ = state_passing.state_passing_fwd(states, dA_cumsum, l, states_in_dtype=C.dtype)
    cb = bmm.bmm_fwd(C, B, chunk_size)   # fp32, as the backward recomputes it
    cb_narrow = bmm.bmm_fwd(C, B, chunk_size, C.dtype)   # as the forward makes it
    dy = torch.randn_like(x)
    ddA = torch.zeros_like(dA_cumsum)
    ddt_out = torch.zeros_like(dt_out)
    dstates_in = chunk_scan.chunk_scan_bwd_dstates(dy, C, dA_cumsum)
    dstates, _ = state_passing.state_passing_bwd(dstates_in, states_in, dA_cumsum, ddA, l)
    dcb = bmm.bmm_bwd_dcb(dy, x, cb, dt_out, dA_cumsum, ddA)
    factor = combined.dt_nonnegative(True, (0.0, math.inf))   # the causal loops as training runs them (softplus)
    stages = {
        "chunk_cumsum_fwd": lambda: chunk_cumsum.chunk_cumsum_fwd(dt, A, chunk_size, dt_bias, True),
        "chunk_state_passing_fwd": lambda: state_passing.chunk_state_passing_fwd(B, x, dt_out, dA_cumsum,
                                                                                 states_in_dtype=C.dtype),
        "chunk_state_fwd": lambda: chunk_state.chunk_state_fwd(B, x, dt_out, dA_cumsum),
        "state_passing_fwd": lambda: state_passing.state_passing_fwd(states, dA_cumsum, l, states_in_dtype=C.dtype),
        "bmm_fwd": lambda: bmm.bmm_fwd(C, B, chunk_size, C.dtype),
        "chunk_scan_fwd": lambda: chunk_scan.chunk_scan_fwd(cb_narrow, x, dt_out, dA_cumsum, C, states_in, D,
                                                            factor_decay=factor),
        CB_FP32_ROW: lambda: chunk_scan.chunk_scan_fwd(cb, x, dt_out, dA_cumsum, C, states_in, D, factor_decay=factor),
        "chunk_scan_state_passing_bwd": lambda: state_passing.chunk_scan_state_passing_bwd(dy, C, states_in, dA_cumsum,
                                                                                           ddA),
        "chunk_scan_bwd_dstates": lambda: chunk_scan.chunk_scan_bwd_dstates(dy, C, dA_cumsum),
        "state_passing_bwd": lambda: state_passing.state_passing_bwd(dstates_in, states_in, dA_cumsum, ddA, l),
        "chunk_scan_bwd_dx": lambda: chunk_scan.chunk_scan_bwd_dx(cb, dy, x, B, dstates, dt_out, dA_cumsum,
                                                                  ddt_out, D, factor_decay=factor),
        "bmm_bwd_dcb": lambda: bmm.bmm_bwd_dcb(dy, x, cb, dt_out, dA_cumsum, ddA, factor_decay=factor),
        "chunk_scan_bwd_dc": lambda: chunk_scan.chunk_scan_bwd_dc(dcb, B, C, dy, states_in, dA_cumsum, ddA),
        "chunk_state_bwd_db": lambda: chunk_state.chunk_state_bwd_db(x, B, C, dcb, dstates, dt_out, dA_cumsum, ddA),
        "chunk_cumsum_bwd": lambda: chunk_cumsum.chunk_cumsum_bwd(ddA, ddt_out, dt, A, dt_bias, True),
    }
    full_inputs, leaves = make_ssd_inputs(*shape)

    def forward():
        return combined.ssd_triton(**full_inputs, chunk_size=chunk_size, dt_softplus=True)

    return stages, forward, lambda: forward().backward(dy), leaves


def stage_times(shape, chunk_size):
    stages, forward, forward_backward, leaves = stage_calls(shape, chunk_size)
    times = {name: bench_ms(fn) for name, fn in stages.items()}
    with torch.no_grad():
        fwd = bench_ms(forward)
    return times, fwd, bench_ms(forward_backward, grad_to_none=leaves)


def sweep(shape, chunk_size, launchers=None, tiles=(64, 128), extra=None, around_shipped=False):
    """Each launcher alone over tile caps × num_warps × num_stages, and over the values in
    `extra` ({setting: values}) of the launcher-specific settings that launcher takes (None:
    unset); prints launch.SETTINGS to keep. `around_shipped`: only the `extra` values, each
    on top of the launcher's shipped settings."""
    stages, *_ = stage_calls(shape, chunk_size)
    chosen = {}
    print(f"{'launcher':24s} {'default':>8s} {'best':>8s}  best settings")
    for name, fn in stages.items():
        if (launchers and name not in launchers) or name == CB_FP32_ROW:
            continue
        cand_tiles = (64,) if name.startswith(("state_passing", "chunk_cumsum")) else tiles
        own = {key: (None, *values) for key, values in (extra or {}).items() if values and name in launch.SPECIFIC_SETTINGS[key]}
        grid = []
        shipped = dict(launch.SETTINGS.get(name, {}))
        bases = [shipped] if around_shipped else [
            dict(tile=tile, num_warps=warps, num_stages=pipeline)
            for tile, warps, pipeline in itertools.product(cand_tiles, (4, 8), (1, 2, 3))]
        for base, picks in itertools.product(bases, itertools.product(*own.values())):
            settings = dict(base)
            for key, value in zip(own, picks):
                if value is None:   # unset, even where the shipped settings set it
                    settings.pop(key, None)
                else:
                    settings[key] = value
            grid.append(settings)
        launch.SETTINGS.pop(name, None)
        default = bench_ms(fn)
        timings = []
        for settings in grid:
            launch.SETTINGS[name] = settings
            try:
                timings.append((bench_ms(fn), settings))
            except Exception as err:  # noqa: BLE001 - e.g. out of shared memory: not a candidate
                print(f"  {name} {settings}: {type(err).__name__}")
        best_ms, best = min(timings, key=lambda t: t[0])
        launch.SETTINGS[name] = best if best_ms < default else {}
        if best_ms < default:
            chosen[name] = best
        print(f"{name:24s} {default:8.3f} {best_ms:8.3f}  {best}", flush=True)
        if around_shipped:
            print("    " + "  ".join(f"{ms:.3f} {settings}" for ms, settings in timings), flush=True)
    print("SETTINGS =", chosen)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="b8_L2048_h32", choices=list(ALL_SHAPES))
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=[256, 128])
    parser.add_argument("--tiles", type=int, nargs="*", default=None,
                        help="tile caps: the stage table's columns (default: the shipped settings), "
                             "the sweep's candidates (default: 64 128)")
    parser.add_argument("--sweep", action="store_true", help="search launch settings per launcher (first chunk size)")
    parser.add_argument("--launchers", nargs="*", help="--sweep only these launchers")
    parser.add_argument("--around-shipped", action="store_true",
                        help="--sweep only the launcher-specific values given, on top of the shipped settings")
    parser.add_argument("--heads-per-program", type=int, nargs="*", default=[],
                        help="--sweep also these heads per program (launch.HEAD_SPLIT_LAUNCHERS)")
    parser.add_argument("--tile-dstate", type=int, nargs="*", default=[],
                        help="--sweep also these caps on dstate tiles (launch.DSTATE_LAUNCHERS)")
    parser.add_argument("--block-h", type=int, nargs="*", default=[],
                        help="--sweep also these heads per program of chunk_cumsum (launch.BLOCK_H_LAUNCHERS)")
    parser.add_argument("--grid-programs", type=int, nargs="*", default=[],
                        help="--sweep: grid_programs values (head splits; the fused state passings' dstate split)")
    parser.add_argument("--tile-k", type=int, nargs="*", default=[],
                        help="--sweep also these steps of the causal loops (launch.K_LAUNCHERS)")
    parser.add_argument("--heads-fastest", action="store_true",
                        help="--sweep also the grid with heads innermost (launch.HEAD_GRID_LAUNCHERS)")
    args = parser.parse_args()
    shape = ALL_SHAPES[args.shape]
    if args.sweep:
        print(f"# launch-settings sweep, {args.shape} {shape}, chunk {args.chunk_sizes[0]}, "
              f"{torch.cuda.get_device_name()}, triton {triton.__version__}")
        return sweep(shape, args.chunk_sizes[0], args.launchers, args.tiles or (64, 128),
                     {"heads_per_program": args.heads_per_program, "tile_dstate": args.tile_dstate,
                      "block_h": args.block_h, "tile_k": args.tile_k, "grid_programs": args.grid_programs,
                      "heads_fastest": [True] if args.heads_fastest else []},
                     args.around_shipped)
    print(f"# SSD per-stage time, {args.shape} {shape}, bf16, {torch.cuda.get_device_name()}, "
          f"triton {triton.__version__}")
    columns, results = [], []
    for chunk_size in args.chunk_sizes:
        for tile in args.tiles or [None]:
            cap_tiles(tile)
            columns.append(f"Q{chunk_size}/" + (f"t{tile}" if tile else "shipped"))
            results.append(stage_times(shape, chunk_size))
    print(f"{'stage (ms)':24s} " + " ".join(f"{c:>11s}" for c in columns))
    for name in results[0][0]:
        print(f"{name:24s} " + " ".join(f"{r[0][name]:11.3f}" for r in results))
    for label, pick in (("sum of fwd stages", lambda r: sum(v for k, v in r[0].items()
                                                            if "_bwd" not in k and k not in COMPARISON_ROWS)),
                        ("sum of bwd stages", lambda r: sum(v for k, v in r[0].items()
                                                            if "_bwd" in k and k not in COMPARISON_ROWS)),
                        ("ssd_triton fwd", lambda r: r[1]), ("ssd_triton fwd+bwd", lambda r: r[2])):
        print(f"{label:24s} " + " ".join(f"{pick(r):11.3f}" for r in results))


if __name__ == "__main__":
    main()
