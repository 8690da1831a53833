"""Where a profiled training step's time goes, from the Chrome trace that
`logging.profile_steps` writes: the window's wall time, how long the GPU was busy (the union
of its kernels and copies), and the CPU operators and CUDA runtime calls that took longest.
For steps bound by the host (the GPU waits while Python runs), which the profiler's own
table, sorted by GPU time, does not show.

    python3 bench/trace_summary.py RUN_DIR/profile/rank0-steps6-7.json [--top 25]
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    events = [e for e in json.load(open(args.trace))["traceEvents"] if e.get("ph") == "X" and "dur" in e]
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
