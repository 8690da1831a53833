"""Tokens/s per GPU of the parallel trainer's runs against one GPU's, from their metrics.jsonl
(bench/device_train_parallel.sh makes the runs). The median over logged steps after the first
five (compilation, warm-up); writes bench/results/train-parallel-<gpu>-<model>.json.
A run named `<name>-graph` (train.cuda_graph) is compared with the one-GPU run `one-graph`
when there is one, so that both sides launch their steps the same way.

    python3 bench/train_parallel_report.py OUT one dp2 tp2 cp2 one-graph tp2-graph --model 130m
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import results_path  # noqa: E402


def summarize(run_dir: Path, skip: int = 5) -> dict:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "tokens_per_s" in s]
    last = {}
    for s in steps:   # a resumed run appends: the last row of each step wins
        last[s["step"]] = s
    timed = [s for step, s in sorted(last.items()) if step > skip]
    if not timed:
        raise SystemExit(f"{run_dir}: no logged step after step {skip} to time (train longer)")
    parallel = cfg.get("parallel", {})
    tp, cp = parallel.get("tp", 1), parallel.get("cp", 1)
    graphed = bool(cfg.get("train", {}).get("cuda_graph", False))
    return {"tp": tp, "cp": cp, "cuda_graph": graphed, "steps": max(last),
            "grad_accum": int(cfg.get("train", {}).get("grad_accum", 1)),
            "sequence_parallel": bool(parallel.get("sequence_parallel", False)),
            "tp_comm_overlap": bool(parallel.get("tp_comm_overlap", False)),
            "tokens_per_s": statistics.median(s["tokens_per_s"] for s in timed),
            "mfu": statistics.median(s.get("mfu", 0.0) for s in timed), "loss_at_last_step": last[max(last)]["loss"],
            "peak_mem_gib": max(s.get("peak_mem_gib", 0.0) for s in timed)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the folder holding one run folder per name")
    parser.add_argument("single", help="the one-GPU run's name (and `<single>-graph`, if it ran)")
    parser.add_argument("runs", nargs="+", help="the parallel runs' names (2 GPUs each)")
    parser.add_argument("--model", default="130m", help="the config the runs trained (for the file name)")
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    singles = {name: summarize(args.out / name) for name in (args.single, f"{args.single}-graph")
               if (args.out / name).exists()}
    graphed = f"{args.single}-graph"
    rows = []
    print(f"# {gpu}: the trainer's median tokens/s after step 5")
    print(f"{'run':>10} {'tp':>3} {'cp':>3} {'dp':>3} {'tok/s/gpu':>10} {'one GPU':>10} {'efficiency':>10} {'MFU':>6} "
          f"{'GiB':>5} {'loss':>7} {'steps':>5}")
    for name in [*singles, *(r for r in args.runs if r not in singles)]:
        run = summarize(args.out / name)
        world = 1 if name in singles else 2
        baseline = graphed if graphed in singles and (name.endswith("-graph") or args.single not in singles) \
            else args.single
        one = singles[baseline]
        per_gpu = run["tokens_per_s"] / world
        row = {"run": name, "world": world, "dp": world // (run["tp"] * run["cp"]), **run,
               "tokens_per_s_per_gpu": per_gpu, "single_gpu_run": baseline,
               "single_gpu_tokens_per_s": one["tokens_per_s"], "efficiency": per_gpu / one["tokens_per_s"]}
        rows.append(row)
        print(f"{name:>10} {row['tp']:>3} {row['cp']:>3} {row['dp']:>3} {per_gpu:>10,.0f} {one['tokens_per_s']:>10,.0f} "
              f"{row['efficiency']:>10.1%} {100 * run['mfu']:>5.1f}% {run['peak_mem_gib']:>5.1f} "
              f"{run['loss_at_last_step']:>7.4f} {run['steps']:>5}")
    out = results_path("train-parallel", f"{gpu}-{args.model}")
    out.parent.mkdir(exist_ok=True)
    command = (f"GRAD_ACCUM={rows[0]['grad_accum']} MODEL={args.model} STEPS={rows[0]['steps']} "
               f"RUNS='{' '.join([*singles, *args.runs])}' bash bench/device_train_parallel.sh")
    out.write_text(json.dumps({"gpu": gpu, "model": args.model, "command": command, "rows": rows}, indent=1) + "\n")
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
