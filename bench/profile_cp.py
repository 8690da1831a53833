"""What context parallelism adds to a training step, measured on one GPU.

The parallel LM at tp = cp = 1 with the ContextParallel hook installed anyway (its
collectives then run over one rank: the halo exchange has no partner, the all-gathers copy),
beside the same model without the hook, on the tokens one rank of a CP=`--cp` run holds.
The difference is the GPU work CP adds per rank, without the communication: each layer's
state from zero and the second state passing in forward, the incoming state's gradient
through y in backward, and the bookkeeping. Prints both step times (eager and CUDA-graphed)
and the kernels whose CUDA time grows most with the hook; writes
bench/results/profile-cp-<gpu>.json.

    torchrun --nproc-per-node 1 bench/profile_cp.py --config configs/1.3b.yaml --cp 2 model.ngroups=2
"""

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_parallel import build_step, time_steps  # noqa: E402
from bench.common import cuda_time_by_kernel, results_path  # noqa: E402
from mamba_train.config import load_config  # noqa: E402
from mamba_train.model import Mamba2LM  # noqa: E402
from mamba_train.parallel import init_parallel, parallelize_model, validate_layout  # noqa: E402
from mamba_train.parallel.context_parallel import ContextParallel  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/1.3b.yaml")
    parser.add_argument("--cp", type=int, default=2, help="the CP size whose per-rank piece is measured")
    parser.add_argument("--seqlen", type=int, default=None,
                        help="the whole sequence (default: the config's data.seq_len); one rank holds seqlen / cp")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: the config's train.micro_batch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.ngroups=2")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    args.seqlen = args.seqlen or cfg.data.seq_len
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 50277
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_world_size() != 1:
        parser.error("runs as one process: torchrun --nproc-per-node 1")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    local = args.seqlen // args.cp
    batch = args.micro_batch or cfg.train.micro_batch
    dims = init_parallel(validate_layout(cfg.model, local, 1))
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, local + 1), device=device)
    inputs = (tokens[:, :-1], tokens[:, 1:], torch.zeros(batch, local, dtype=torch.int32, device=device))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {name}: {args.config} {args.overrides}, micro {batch} x {local} tokens (one rank of CP={args.cp} "
          f"at {args.seqlen})" + (", bf16 autocast" if device.type == "cuda" else ""))
    print(f"{'hook':>5} {'graph':>5} {'step ms':>8} {'CPU ms':>7}")
    kernel_ms, rows = {}, []   # kernel_ms[hooked]: {kernel: CUDA ms per step}
    for hooked in (False, True):
        model = parallelize_model(Mamba2LM(cfg.model), dims).to(device)
        if hooked:
            model.context_parallel = ContextParallel(dims.cp_group, cfg.model.d_conv)
            for layer in model.layers:
                layer.mixer.context_parallel = model.context_parallel
        for graph in (False, True) if device.type == "cuda" else (False,):
            step = build_step(graph, model, *inputs, amp)
            seconds, enqueue = time_steps(step, device, args.warmup, args.steps)
            print(f"{'yes' if hooked else 'no':>5} {'yes' if graph else 'no':>5} {1e3 * seconds:8.1f} "
                  f"{1e3 * enqueue:7.1f}", flush=True)
            rows.append({"cp_hook": hooked, "cuda_graph": graph, "step_ms": 1e3 * seconds, "enqueue_ms": 1e3 * enqueue})
            if not graph and device.type == "cuda":
                kernel_ms[hooked] = cuda_time_by_kernel(step)
            del step
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    growth = []
    if kernel_ms:
        plain, with_hook = kernel_ms[False], kernel_ms[True]
        growth = sorted(((with_hook.get(k, 0.0) - plain.get(k, 0.0), k) for k in set(plain) | set(with_hook)),
                        reverse=True)[:20]
        print(f"# CUDA ms per step: without the hook {sum(plain.values()):.1f}, with it "
              f"{sum(with_hook.values()):.1f}; the kernels that grow most:")
        for delta, kernel in growth:
            print(f"  {delta:+8.2f}  {plain.get(kernel, 0.0):8.2f} -> {with_hook.get(kernel, 0.0):8.2f}  {kernel[:90]}")
    out = results_path("profile-cp", name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": name, "config": args.config, "overrides": args.overrides, "cp": args.cp,
                               "micro_batch": batch, "local_tokens": local, "rows": rows,
                               "cuda_ms_per_step": {("hook" if k else "no_hook"): sum(v.values()) for k, v in kernel_ms.items()},
                               "kernels_that_grow_ms": [{"delta": d, "kernel": k} for d, k in growth]},
                              indent=1) + "\n")
    print(f"# wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
