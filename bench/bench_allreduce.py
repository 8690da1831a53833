"""The TP block's all-reduce on its own: NCCL beside torch's symmetric-memory all-reduces.

A 1.3b TP=2 step makes 97 all-reduces of the block output, (4, 2048, 2048) bf16 = 32 MiB,
and spends ~15.6 ms in them (bench_parallel.py --profile, docs/design-notes.md). This times one
such all-reduce each way, every rank the same fixed number of iterations (do_bench's own
repetition count could differ between ranks and hang a collective), CUDA events, median:
  nccl             dist.all_reduce (in place)
  symm one-shot    torch.ops.symm_mem.one_shot_all_reduce: each rank reads every peer's buffer
  symm two-shot    torch.ops.symm_mem.two_shot_all_reduce_: reduce-scatter + all-gather by loads
  copy-in          the copy into the symmetric buffer that a layer not writing there would add

    torchrun --standalone --nproc-per-node 2 bench/bench_allreduce.py [--mib 32] [--iters 50]

NVLink multicast stays off (bench/device_env.sh), so the symmetric-memory kernels use plain
peer loads and stores.
"""

import argparse
import os
import statistics

import torch
import torch.distributed as dist


def timed(fn, iters, warmup=10):
    """Median milliseconds of fn() over `iters` calls, ranks in step."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    dist.barrier()
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, nargs="*", default=[32.0])
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    group = dist.group.WORLD
    world = dist.get_world_size()
    rows = []
    for mib in args.mib:
        numel = int(mib * 2**20) // 2
        x = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
        row = {"MiB": mib, "nccl": timed(lambda: dist.all_reduce(x), args.iters)}
        try:
            import torch.distributed._symmetric_memory as symm_mem
            buf = symm_mem.empty(numel, device="cuda", dtype=torch.bfloat16)
            symm_mem.rendezvous(buf, group.group_name)
            buf.copy_(x)
            expected = buf.clone()
            dist.all_reduce(expected)
            got = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group.group_name)
            row["one-shot err"] = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
            row["symm one-shot"] = timed(lambda: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group.group_name),
                                         args.iters)
            row["symm two-shot"] = timed(lambda: torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group.group_name),
                                         args.iters)
            row["copy-in"] = timed(lambda: buf.copy_(x), args.iters)
        except Exception as err:  # noqa: BLE001 - report what this machine's torch lacks, keep NCCL's row
            row["symm error"] = f"{type(err).__name__}: {str(err)[:200]}"
        rows.append(row)
    if rank == 0:
        print(f"# {torch.cuda.get_device_name()} x{world}, torch {torch.__version__}, bf16, median ms of "
              f"{args.iters}; NCCL_PROTO={os.environ.get('NCCL_PROTO', '-')} "
              f"NCCL_MIN_NCHANNELS={os.environ.get('NCCL_MIN_NCHANNELS', '-')}")
        for row in rows:
            busbw = row["MiB"] * 2**20 * 2 * (world - 1) / world / (row["nccl"] * 1e-3) / 1e9
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                  + f" nccl_busbw={busbw:.0f}GB/s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
