"""Where a profiled training step's time goes, from the Chrome trace that
`logging.profile_steps` writes: the window's wall time, how long the GPU was busy (the union
of its kernels and copies), and the CPU operators and CUDA runtime calls that took longest.
For steps bound by the host (the GPU waits while Python runs), which the profiler's own
table, sorted by GPU time, does not show.

    python3 bench/trace_summary.py RUN_DIR/profile/rank0-steps6-7.json [--top 25]
    python3 bench/trace_summary.py TRACE.json --by-op [--top 40]

`--by-op` instead sums every kernel's GPU time under the CPU operators that launched it (the
innermost three enclosing ones, joined by " < "), with the kernel's name: which op each
copy, cast or small reduction comes from (`bench_train.py --profile --trace-dir DIR` writes
such traces).
"""

import argparse
import json
from collections import defaultdict


def union_us(intervals):
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def kernels_by_op(events, depth=3):
    """{(launching ops, kernel name): (GPU ms, count)}: each kernel tied to its launch (the
    runtime call with the same correlation id) and the CPU ops open on that thread then."""
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ops_at = {}   # correlation -> names of the ops enclosing its launch, innermost first
    by_thread = defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op":
            by_thread[e["tid"]].append((e["ts"], 0, e["ts"] + e["dur"], e["name"]))
    for e in launches.values():
        by_thread[e["tid"]].append((e["ts"], 1, e["ts"] + e["dur"], e["args"]["correlation"]))
    for items in by_thread.values():
        stack = []
        for start, is_launch, stop, what in sorted(items, key=lambda t: (t[0], t[1], -t[2])):
            while stack and stack[-1][0] <= start:   # ops that ended before this event
                stack.pop()
            if is_launch:
                ops_at[what] = [name for _, name in reversed(stack[-depth:])]
            else:
                stack.append((stop, what))
    totals = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            ops = ops_at.get(e.get("args", {}).get("correlation"), [])
            key = (" < ".join(ops) or "(no op)", e["name"][:60])
            totals[key][0] += 1e-3 * e["dur"]
            totals[key][1] += 1
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--by-op", action="store_true", help="GPU time by launching CPU op and kernel")
    args = parser.parse_args()
    events = [e for e in json.load(open(args.trace))["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    if args.by_op:
        totals = kernels_by_op(events)
        print(f"GPU ms (whole trace), kernels, launching ops (innermost first) | kernel; "
              f"total {sum(t for t, _ in totals.values()):.1f} ms")
        for (ops, kernel), (ms, count) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:args.top]:
            print(f"  {ms:9.2f} {count:6d}  {ops[:110]} | {kernel}")
        return
    start = min(e["ts"] for e in events)
    stop = max(e["ts"] + e["dur"] for e in events)
    gpu = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    print(f"window {1e-3 * (stop - start):.1f} ms | GPU busy {1e-3 * union_us(gpu):.1f} ms "
          f"({len(gpu)} kernels and copies)")
    for cat in ("cpu_op", "cuda_runtime", "python_function", "user_annotation"):
        totals, counts = defaultdict(float), defaultdict(int)
        for e in events:
            if e.get("cat") == cat:
                totals[e["name"]] += e["dur"]
                counts[e["name"]] += 1
        if not totals:
            continue
        print(f"\n{cat}: total (inclusive) ms, calls")
        for name, dur in sorted(totals.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {1e-3 * dur:9.2f} {counts[name]:6d}  {name[:90]}")


if __name__ == "__main__":
    main()
