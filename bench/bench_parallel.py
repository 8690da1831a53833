"""Parallel efficiency: TP, CP and DP training steps per GPU beside one GPU doing the same work.

For each mode the parallel run and the one-GPU run process the same tokens per step: TP
and CP split one model step over the GPUs (one GPU runs the whole step alone), DP runs one
micro-batch per GPU (one GPU runs one micro-batch). efficiency = parallel tokens/s per GPU
/ one-GPU tokens/s (1.0: perfect). Forward + backward, the gradient all-reduce over DP × CP
bucketed and overlapped with the backward as DDP does (data_parallel.GradientBuckets), median
of timed steps after warm-up. `--weights fp32` (default): fp32 weights under bf16 autocast, as
one process trains; `--weights bf16`: bf16 weights and gradients, as the parallel trainer's
model runs under DeepSpeed's bf16. Writes bench/results/parallel-<gpu>.json with rows
{"mode", "world", "seqlen", "tokens_per_s_per_gpu", "single_gpu_tokens_per_s", "efficiency"},
plus "grad_accum" and rank 0's "step_ms" and "enqueue_ms" (the CPU's part of the step: when it
is close to the step, TP and CP are bound by launching kernels, not by the GPU).

    torchrun --nproc-per-node 2 bench/bench_parallel.py --config configs/1.3b.yaml model.ngroups=2
    torchrun --nproc-per-node 2 bench/bench_parallel.py --device cpu --config configs/tiny-cpu.yaml \
        model.ngroups=2 --runs tp:64 cp:128 dp:64:2   # smoke (gloo)

TP needs ngroups divisible by tp (1.3b's mamba_ssm default is ngroups 1: pass model.ngroups=2
or 8, as the Mamba-2 paper does for TP). Not run by the tests.

A run is `mode:seqlen[:accum][:graph]`: with accum > 1 each step runs that many micro-batches
and only the last one's backward all-reduces the gradients, as training with `train.grad_accum`
does (the one-GPU run does the same micro-batches). With `graph`, the forward and backward of
all micro-batches, collectives included (the gradient all-reduce too, on its side stream),
replay from one CUDA graph on both sides: the CPU then launches one graph per step instead of
every kernel, which is what a TP or CP rank, with half the GPU work of one GPU and all of its
launches, otherwise waits on. The all-reduce bus bandwidth of the GPUs (nccl-tests' definition)
is measured first and written beside the rows: TP and CP efficiency depend on it.
"""

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (capture_forward_backward, cuda_kernel_timeline, cuda_time_by_kernel,  # noqa: E402
                          is_matmul_kernel, results_path)
from mamba_train.config import load_config  # noqa: E402
from mamba_train.model import Mamba2LM  # noqa: E402
from mamba_train.parallel import (context_parallel_piece, init_parallel, parallelize_model,  # noqa: E402
                                  validate_layout)
from mamba_train.parallel.data_parallel import GradientBuckets  # noqa: E402

# (mode, seqlen, accumulation, CUDA graph): the runs at 2 GPUs, TP and CP also
# graphed (their eager steps wait on the CPU), and DP as training runs it
RUNS = [("tp", 2048, 1, False), ("tp", 2048, 1, True), ("cp", 2048, 1, False), ("cp", 2048, 1, True),
        ("dp", 2048, 1, False), ("dp", 2048, 4, False), ("cp", 16384, 1, True), ("cp", 32768, 1, True)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup: int, steps: int) -> tuple[float, float]:
    """Median seconds of one step, and of its CPU part: until step() returns, before the wait
    for the GPU. When the two are close, the step is bound by launching, not by the GPU."""
    for _ in range(warmup):
        step()
    times, enqueue = [], []
    for _ in range(steps):
        sync(device)
        started = time.perf_counter()
        step()
        enqueue.append(time.perf_counter() - started)
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times), statistics.median(enqueue)


def make_step(model, input_ids, labels, seq_idx, amp, accum=1, buckets=None):
    """accum micro-batches of forward+backward. With `buckets` (a GradientBuckets over model) the
    last backward all-reduces the gradients as it goes, and the step zeroes them through it: the
    gradients stay views of its buckets (model.zero_grad would set them to None)."""
    zero_grad = buckets.zero_grad if buckets is not None else lambda: model.zero_grad(set_to_none=True)

    def step():
        for micro in range(accum):
            if buckets is not None:
                buckets.sync = micro == accum - 1
            with amp():
                loss = model.loss(input_ids, labels, seq_idx)
            loss.backward()
        zero_grad()
    return step


def make_graphed_step(model, input_ids, labels, seq_idx, amp, accum=1, buckets=None):
    """make_step's step with forward+backward, collectives included, replayed from one CUDA
    graph (bench.common.capture_forward_backward). Without buckets the graph owns the gradients
    (each replay's first accumulation writes them). With buckets the graph writes into them: it
    opens with their zero_grad (captured: one fill per bucket, and in Python the views put back
    after capture_forward_backward's warm-up set the gradients to None), and the last
    micro-batch's backward captures the all-reduces, side stream included. `amp` must not cache
    casts (capture_forward_backward says why)."""
    def forward_backward():
        if buckets is not None:
            buckets.zero_grad()
        for micro in range(accum):
            if buckets is not None:
                buckets.sync = micro == accum - 1
            with amp():
                loss = model.loss(input_ids, labels, seq_idx)
            loss.backward()

    graph, _ = capture_forward_backward(forward_backward, model)

    def step():
        graph.replay()
    return step


def build_step(graph, model, input_ids, labels, seq_idx, amp, accum=1, buckets=None):
    if graph:
        return make_graphed_step(model, input_ids, labels, seq_idx, amp, accum, buckets)
    return make_step(model, input_ids, labels, seq_idx, amp, accum, buckets)


def kernel_kind(name: str) -> str:
    """A kernel's family, for the profile's summary."""
    lowered = name.lower()
    if "nccl" in lowered:
        return "nccl"
    if is_matmul_kernel(name):
        return "matmul"
    if "memcpy" in lowered or "memset" in lowered:
        return "copy"
    if lowered.startswith("void at::") or lowered.startswith("void (anonymous namespace)") or "at::native" in lowered:
        return "torch"
    return "triton/other"   # our Triton kernels (named _…), and anything not matched above


def kernel_label(name: str, width: int = 100) -> str:
    """A kernel's name without `void` and its argument list, template arguments kept (torch's
    elementwise kernels differ only there)."""
    name, depth = name.removeprefix("void "), 0
    for i, char in enumerate(name):
        depth += (char == "<") - (char == ">")
        if char == "(" and depth == 0 and not name.startswith("(anonymous namespace)", i):
            name = name[:i]
            break
    return name[:width]


def print_excess(parallel_ms: dict, single_ms: dict, share: int, what: str, top: int = 25):
    """Where a parallel step loses its efficiency: each kernel's CUDA ms per step on one parallel
    rank beside the one-GPU step's share of it (its ms / share: the world for TP and CP, whose
    one-GPU step does every rank's work; 1 for DP, whose one-GPU step is one rank's), sorted by
    the excess."""
    print(f"# profile, {what}: CUDA ms per step by kernel family, one-GPU share (ms / {share}) -> rank 0")
    for kind in ("matmul", "triton/other", "torch", "copy", "nccl"):
        one = sum(ms for name, ms in single_ms.items() if kernel_kind(name) == kind) / share
        par = sum(ms for name, ms in parallel_ms.items() if kernel_kind(name) == kind)
        print(f"  {kind:>12} {one:8.2f} -> {par:8.2f}  ({par - one:+.2f})")
    print(f"  {'all':>12} {sum(single_ms.values()) / share:8.2f} -> {sum(parallel_ms.values()):8.2f}")
    excess = sorted(((parallel_ms.get(k, 0.0) - single_ms.get(k, 0.0) / share, k)
                     for k in set(parallel_ms) | set(single_ms)), reverse=True)
    print(f"# the {top} kernels with the largest excess (ms per step: one-GPU share -> rank 0)")
    for delta, name in excess[:top]:
        print(f"  {delta:+7.2f}  {single_ms.get(name, 0.0) / share:7.2f} -> {parallel_ms.get(name, 0.0):7.2f}  "
              f"{kernel_label(name)}")


def collective_waits(timelines: list) -> dict:
    """{NCCL kernel label: (calls, rank 0's µs, the transfer's µs at most, rank 0's wait at least)}
    from every rank's NCCL kernels in start order ([(name, start µs, µs)] per rank). A collective's
    kernel runs on every rank from its launch until the last rank's data has moved, so it
    includes waiting for a rank that arrives later; the rank that arrives last waits least.
    Calls are matched by their order within a label (each communicator issues them in one
    order on every rank), and a call's shortest duration over the ranks bounds its transfer.
    A label whose count differs between ranks is left out."""
    per_rank = []
    for timeline in timelines:
        by_label = {}
        for name, _, micros in timeline:
            by_label.setdefault(kernel_label(name), []).append(micros)
        per_rank.append(by_label)
    waits = {}
    for label, rank0 in per_rank[0].items():
        calls = [by_label.get(label, []) for by_label in per_rank]
        if any(len(c) != len(rank0) for c in calls):
            continue
        transfer = sum(min(durations) for durations in zip(*calls))
        waits[label] = (len(rank0), sum(rank0), transfer, sum(rank0) - transfer)
    return waits


def print_collective_waits(timelines: list, steps: int):
    print(f"# NCCL kernels, ms per step on rank 0: the transfer (at most: each call's shortest kernel over the "
          f"{len(timelines)} ranks) and the wait for later ranks (at least: the rest)")
    for label, (calls, total, transfer, wait) in sorted(collective_waits(timelines).items(), key=lambda kv: -kv[1][1]):
        print(f"  {total / 1e3 / steps:8.2f} = transfer {transfer / 1e3 / steps:7.2f} + wait {wait / 1e3 / steps:7.2f}"
              f"  ({calls // steps} calls a step)  {label}")


def compute_idle(timeline: list, min_gap_us: float = 2.0) -> dict:
    """{label of the kernel after a gap: (gaps, µs)} for the gaps of at least min_gap_us in
    which no kernel but NCCL's runs (timeline: [(name, start µs, µs)] in start order): where the
    compute waits, for a collective or for the kernel before. A CUDA graph's replay leaves ~1 µs
    between kernels, so the gaps counted are waits (and the host's gap between two steps)."""
    idle, busy_until = {}, None
    for name, start, micros in timeline:
        if kernel_kind(name) == "nccl":
            continue
        if busy_until is not None and start - busy_until >= min_gap_us:
            gaps, total = idle.get(kernel_label(name), (0, 0.0))
            idle[kernel_label(name)] = (gaps + 1, total + start - busy_until)
        busy_until = start + micros if busy_until is None else max(busy_until, start + micros)
    return idle


def print_compute_idle(parallel: list, single: list, steps: int, top: int = 12):
    """The idle time of a parallel rank's compute beside the one-GPU step's, and the kernels
    the parallel rank's gaps end at."""
    idle, idle_one = compute_idle(parallel), compute_idle(single)
    total, total_one = (sum(us for _, us in d.values()) / 1e3 / steps for d in (idle, idle_one))
    print(f"# compute idle (no kernel but NCCL's running, gaps >= 2 us), ms per step: one GPU {total_one:.2f}, "
          f"rank 0 {total:.2f}; the kernels rank 0's gaps end at")
    for label, (gaps, us) in sorted(idle.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {us / 1e3 / steps:8.2f}  ({gaps // steps} gaps a step)  {label}")


def print_producers(timeline: list, steps: int, pattern: str = "reduce_kernel"):
    """For kernels whose label contains `pattern` (torch's reductions): their ms per step by
    the kernel that ran before each (the one whose partial sums it reduces, as a rule)."""
    kernels = [(name, micros) for name, _, micros in timeline if kernel_kind(name) != "nccl"]
    by_producer = {}
    for (before, _), (name, micros) in zip(kernels, kernels[1:]):
        if pattern in name:
            key = (kernel_label(before, 60), kernel_label(name, 60))
            calls, us = by_producer.get(key, (0, 0.0))
            by_producer[key] = (calls + 1, us + micros)
    print(f"# kernels matching {pattern!r} on rank 0 by the kernel before each: ms per step")
    for (before, name), (calls, us) in sorted(by_producer.items(), key=lambda kv: -kv[1][1])[:10]:
        print(f"  {us / 1e3 / steps:8.2f}  ({calls // steps} a step)  {name}  after  {before}")


def allreduce_busbw(device, megabytes=256, repeats=10) -> float:
    """All-reduce bus bandwidth in GB/s (nccl-tests: bytes · 2(n-1)/n / time), bf16."""
    world = dist.get_world_size()
    data = torch.ones(megabytes * 2**20 // 2, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        dist.all_reduce(data)
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(data)
    sync(device)
    seconds = (time.perf_counter() - started) / repeats
    return data.numel() * 2 * 2 * (world - 1) / world / seconds / 1e9


def step_precision(device, weights, graph):
    """(context the forward runs in, the weights' dtype). "fp32": fp32 weights under bf16
    autocast, as one process trains (its gradients, accumulation and all-reduce fp32).
    "bf16": bf16 weights and no autocast, as the parallel trainer's model is under DeepSpeed's
    bf16 (gradients accumulated and reduced in bf16; the fp32 masters live in the optimizer,
    outside this step). On CPU fp32 has no autocast."""
    if weights == "bf16":
        return nullcontext, torch.bfloat16
    if device.type != "cuda":
        return nullcontext, torch.float32
    # a CUDA graph must not keep autocast's cached casts across its capture
    return (lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graph)), torch.float32


def run(mode, seqlen, accum, graph, cfg, device, args, world, rank):
    """(parallel tokens/s per GPU, one-GPU tokens/s or None, this rank's {"step_ms",
    "enqueue_ms"} of the parallel step) for one row."""
    amp, dtype = step_precision(device, args.weights, graph)
    # long sequences keep the tokens of a micro-batch at 2048 (at least one sequence)
    batch = max(1, args.micro_batch * 2048 // seqlen) if seqlen > 2048 else args.micro_batch
    tp, cp = (world, 1) if mode == "tp" else (1, world) if mode == "cp" else (1, 1)
    layout = validate_layout(cfg.model, seqlen, world, tp=tp, cp=cp, sequence_parallel=args.sequence_parallel,
                             tp_comm_overlap=args.tp_comm_overlap)
    dims = init_parallel(layout)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch * layout.dp, seqlen + 1), device=device)
    seq_idx = torch.zeros(batch * layout.dp, seqlen, dtype=torch.int32, device=device)
    rows = slice(dims.dp_rank * batch, (dims.dp_rank + 1) * batch)
    full = Mamba2LM(cfg.model, tp_size=tp)
    model = parallelize_model(full, dims).to(device, dtype)
    buckets = GradientBuckets(model, dims.dp_cp_group)   # TP (a group of one): a no-op
    piece = [context_parallel_piece(t[rows], dims) for t in (tokens[:, :-1], tokens[:, 1:], seq_idx)]
    step = build_step(graph, model, *piece, amp, accum, buckets)
    seconds, enqueue = time_steps(step, device, args.warmup, args.steps)
    busy = {"step_ms": 1e3 * seconds, "enqueue_ms": 1e3 * enqueue}
    parallel_kernels = cuda_time_by_kernel(step) if args.profile else None   # every rank: collectives
    parallel_timeline = None
    if args.profile:   # every rank's kernels: its NCCL ones to tell the transfers from the waits
        try:
            parallel_timeline = cuda_kernel_timeline(step)
            nccl = [kernel for kernel in parallel_timeline if kernel_kind(kernel[0]) == "nccl"]
        except Exception as err:   # a diagnostic: the rest of the profile still prints (and every rank gathers)
            print(f"# rank {rank}: no kernel timeline ({err})", file=sys.stderr)
            nccl = None
        timelines = [None] * world if rank == 0 else None
        dist.gather_object(nccl, timelines)
        if rank == 0 and None not in timelines:
            print_collective_waits(timelines, steps=2)
            print_producers(parallel_timeline, steps=2)
    # tokens of the global step / GPUs: TP and CP share one batch, DP adds a batch per GPU
    parallel = accum * batch * layout.dp * seqlen / seconds / world
    del model, full, step, buckets
    if device.type == "cuda":
        # the parallel run's cached blocks (its graph's pool, the gradient buckets) would
        # otherwise crowd the one-GPU run: after three earlier runs its 32768 tokens did not fit
        torch.cuda.empty_cache()
    single = None
    if rank == 0:  # the same per-step work on one GPU, no groups involved
        try:
            model = Mamba2LM(cfg.model).to(device, dtype)
            one = [t[:batch] for t in (tokens[:, :-1], tokens[:, 1:], seq_idx)]
            one_step = build_step(graph, model, *one, amp, accum)
            seconds, _ = time_steps(one_step, device, args.warmup, args.steps)
            single = accum * batch * seqlen / seconds
            if args.profile:
                print_excess(parallel_kernels, cuda_time_by_kernel(one_step), world if mode in ("tp", "cp") else 1,
                             f"{mode}:{seqlen}:{accum}{':graph' if graph else ''}")
                if parallel_timeline is not None:
                    try:   # a diagnostic: an error here must not keep rank 0 from the barrier below
                        print_compute_idle(parallel_timeline, cuda_kernel_timeline(one_step), steps=2)
                    except Exception as err:
                        print(f"# no one-GPU kernel timeline ({err})", file=sys.stderr)
            del one_step
            del model
        except torch.OutOfMemoryError:
            single = None  # the one-GPU run does not fit: the row reports the parallel figure alone
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dist.barrier()
    return parallel, single, busy


def _parse_run(text):
    mode, *rest = text.split(":")
    graph = rest[-1:] == ["graph"]
    rest = rest[:-1] if graph else rest
    if mode not in ("tp", "cp", "dp") or not 1 <= len(rest) <= 2:
        raise SystemExit(f"--runs: expected mode:seqlen[:accum][:graph] with mode tp, cp or dp, found {text!r}")
    return mode, int(rest[0]), int(rest[1]) if len(rest) == 2 else 1, graph


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/1.3b.yaml")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--micro-batch", type=int, default=None, help="default: the config's train.micro_batch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--tp-comm-overlap", action="store_true",
                        help="with --sequence-parallel: in_proj's gather and out_proj's scatter inside their matmuls")
    parser.add_argument("--weights", default="fp32", choices=["fp32", "bf16"],
                        help="fp32: fp32 weights under bf16 autocast, fp32 gradients (one-process training); "
                             "bf16: bf16 weights and gradients, no autocast (the parallel trainer under DeepSpeed's bf16)")
    parser.add_argument("--profile", action="store_true",
                        help="print where each parallel step's CUDA time goes beside the one-GPU step's (by kernel), "
                             "and each NCCL kernel's time split into transfer and waiting for later ranks")
    parser.add_argument("--runs", nargs="*", default=None,
                        help="mode:seqlen[:accum][:graph] (after the overrides), e.g. tp:2048 dp:2048:8 "
                             "cp:16384:1:graph")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.ngroups=2")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 50277  # GPT-NeoX's, the Pile tokenizer's
    args.micro_batch = args.micro_batch or cfg.train.micro_batch
    runs = [_parse_run(r) for r in args.runs] if args.runs else RUNS
    if args.device == "cpu" and args.profile:
        parser.error("--profile reads CUDA kernel times: it needs --device cuda")
    if args.device == "cpu" and any(graph for *_, graph in runs):
        parser.error("CUDA-graph runs (...:graph, and the default runs) need CUDA: pass --runs")
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    busbw = allreduce_busbw(device)
    if rank == 0:
        print(f"# all-reduce bus bandwidth {busbw:.1f} GB/s (256 MB, bf16)")
        print(f"# {gpu} x{world} | {args.config} d_model={cfg.model.d_model} n_layer={cfg.model.n_layer} "
              f"ngroups={cfg.model.ngroups} | micro_batch={args.micro_batch} | weights {args.weights} | SP={args.sequence_parallel}"
              f"{' (comm overlap)' if args.tp_comm_overlap else ''}")
        print(f"{'mode':>4} {'world':>5} {'seqlen':>7} {'accum':>5} {'graph':>5} {'tok/s/gpu':>12} {'1-gpu tok/s':>12}"
              f" {'efficiency':>10} {'step ms':>8} {'CPU ms':>7}")
    rows = []
    for mode, seqlen, accum, graph in runs:
        parallel, single, busy = run(mode, seqlen, accum, graph, cfg, device, args, world, rank)
        row = {"mode": mode, "world": world, "seqlen": seqlen, "grad_accum": accum, "cuda_graph": graph,
               "tokens_per_s_per_gpu": parallel, **busy,
               "single_gpu_tokens_per_s": single, "efficiency": None if single is None else parallel / single}
        rows.append(row)
        if rank == 0:
            eff = "-" if single is None else f"{parallel / single:.1%}"
            print(f"{mode:>4} {world:>5} {seqlen:>7} {accum:>5} {'yes' if graph else 'no':>5} {parallel:>12,.0f}"
                  f" {single or 0:>12,.0f} {eff:>10}"
                  f" {busy['step_ms']:>8.1f} {busy['enqueue_ms']:>7.1f}", flush=True)
    if rank == 0:
        out = results_path("parallel", gpu)
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"device": gpu, "config": args.config, "overrides": args.overrides,
                                   "sequence_parallel": args.sequence_parallel,
                                   "tp_comm_overlap": args.tp_comm_overlap, "weights": args.weights,
                                   "allreduce_busbw_gbs": busbw, "rows": rows}, indent=1))
        print(f"wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
