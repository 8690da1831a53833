"""Parallel efficiency: TP, CP and DP training steps per GPU beside one GPU doing the same work.

For each mode the parallel run and the one-GPU run process the same tokens per step: TP
and CP split one model step over the GPUs (one GPU runs the whole step alone), DP runs one
micro-batch per GPU (one GPU runs one micro-batch). efficiency = parallel tokens/s per GPU
/ one-GPU tokens/s (1.0: perfect). Forward + backward + gradient all-reduce, bf16 autocast,
median of timed steps after warm-up. Writes bench/results/parallel-<gpu>.json with rows
{"mode", "world", "seqlen", "tokens_per_s_per_gpu", "single_gpu_tokens_per_s", "efficiency"}.

    torchrun --nproc-per-node 2 bench/bench_parallel.py --config configs/1.3b.yaml model.ngroups=2
    torchrun --nproc-per-node 2 bench/bench_parallel.py --device cpu --config configs/tiny-cpu.yaml  # smoke

TP needs ngroups divisible by tp (1.3b's mamba_ssm default is ngroups 1: pass model.ngroups=2
or 8, as the Mamba-2 paper does for TP). Not run by the tests.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mamba_train.config import load_config  # noqa: E402
from mamba_train.model import Mamba2LM  # noqa: E402
from mamba_train.parallel import (context_parallel_piece, init_parallel, parallelize_model,  # noqa: E402
                                  validate_layout)
from mamba_train.parallel.data_parallel import allreduce_gradients  # noqa: E402

# (mode, seqlen): the runs at 2 GPUs
RUNS = [("tp", 2048), ("cp", 2048), ("cp", 16384), ("cp", 32768), ("dp", 2048)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup: int, steps: int) -> float:
    """Median seconds of one step."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        started = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def make_step(model, input_ids, labels, seq_idx, amp, after_backward=lambda: None):
    def step():
        with amp():
            loss = model.loss(input_ids, labels, seq_idx)
        loss.backward()
        after_backward()
        model.zero_grad(set_to_none=True)
    return step


def run(mode, seqlen, cfg, device, args, world, rank):
    """(parallel tokens/s per GPU, one-GPU tokens/s or None) for one row."""
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    batch = args.micro_batch
    tp, cp = (world, 1) if mode == "tp" else (1, world) if mode == "cp" else (1, 1)
    layout = validate_layout(cfg.model, seqlen, world, tp=tp, cp=cp, sequence_parallel=args.sequence_parallel)
    dims = init_parallel(layout)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch * layout.dp, seqlen + 1), device=device)
    seq_idx = torch.zeros(batch * layout.dp, seqlen, dtype=torch.int32, device=device)
    rows = slice(dims.dp_rank * batch, (dims.dp_rank + 1) * batch)
    full = Mamba2LM(cfg.model, tp_size=tp)
    model = parallelize_model(full, dims).to(device)
    piece = [context_parallel_piece(t[rows], dims) for t in (tokens[:, :-1], tokens[:, 1:], seq_idx)]
    step = make_step(model, *piece, amp, after_backward=lambda: allreduce_gradients(model, dims))
    seconds = time_steps(step, device, args.warmup, args.steps)
    # tokens of the global step / GPUs: TP and CP share one batch, DP adds a batch per GPU
    parallel = batch * layout.dp * seqlen / seconds / world
    del model, full, step
    single = None
    if rank == 0:  # the same per-step work on one GPU, no groups involved
        try:
            model = Mamba2LM(cfg.model).to(device)
            one = [t[:batch] for t in (tokens[:, :-1], tokens[:, 1:], seq_idx)]
            seconds = time_steps(make_step(model, *one, amp), device, args.warmup, args.steps)
            single = batch * seqlen / seconds
            del model
        except torch.OutOfMemoryError:
            single = None  # the one-GPU run does not fit: the row reports the parallel figure alone
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dist.barrier()
    return parallel, single


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/1.3b.yaml")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--runs", nargs="*", default=None, help="mode:seqlen, e.g. tp:2048 cp:16384")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.ngroups=2")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 50277  # GPT-NeoX's, the Pile tokenizer's
    runs = [(m, int(n)) for m, n in (r.split(":") for r in args.runs)] if args.runs else RUNS
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if rank == 0:
        print(f"# {gpu} x{world} | {args.config} d_model={cfg.model.d_model} n_layer={cfg.model.n_layer} "
              f"ngroups={cfg.model.ngroups} | micro_batch={args.micro_batch} | SP={args.sequence_parallel}")
        print(f"{'mode':>4} {'world':>5} {'seqlen':>7} {'tok/s/gpu':>12} {'1-gpu tok/s':>12} {'efficiency':>10}")
    rows = []
    for mode, seqlen in runs:
        parallel, single = run(mode, seqlen, cfg, device, args, world, rank)
        row = {"mode": mode, "world": world, "seqlen": seqlen, "tokens_per_s_per_gpu": parallel,
               "single_gpu_tokens_per_s": single, "efficiency": None if single is None else parallel / single}
        rows.append(row)
        if rank == 0:
            eff = "-" if single is None else f"{parallel / single:.1%}"
            print(f"{mode:>4} {world:>5} {seqlen:>7} {parallel:>12,.0f} {single or 0:>12,.0f} {eff:>10}", flush=True)
    if rank == 0:
        out = Path(__file__).parent / "results" / f"parallel-{re.sub(r'[^a-z0-9]+', '-', gpu.lower()).strip('-')}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"device": gpu, "config": args.config, "overrides": args.overrides,
                                   "sequence_parallel": args.sequence_parallel, "rows": rows}, indent=1))
        print(f"wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
