"""Operators per parameter tensor in DeepSpeed's optimizer step (ZeRO-1, bf16, TP=2 on two gloo
processes, CPU): the host work a parallel step pays for each of its gradient tensors, which on
a GPU the CPU launches while the GPU waits (docs/design-notes.md). Counted with torch.profiler
over one `engine.step()` at two depths of a small model; the difference per tensor is printed.

    python bench/step_ops.py
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _aten_ops_in_step(rank, world, port, n_layer, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from mamba_train.config import ModelConfig, OptimConfig
    from mamba_train.parallel import destroy_parallel, setup_parallel

    cfg = ModelConfig(d_model=16, n_layer=n_layer, d_state=8, d_conv=4, expand=2, headdim=8, ngroups=2, chunk_size=8,
                      vocab_size=50)
    run = setup_parallel(cfg, 32, OptimConfig(grad_clip=1.0), 1, 1, tp=2, bf16=True, seed=0)
    ids = torch.randint(0, 50, (1, 33), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "seq_idx": torch.zeros(1, 32, dtype=torch.int32)}
    for step in range(3):   # the last step is counted
        loss = run.engine(batch["input_ids"], batch["seq_idx"], labels=batch["labels"])
        run.engine.backward(loss)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run.engine.step()
    if rank == 0:
        ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        out[n_layer] = (sum(1 for _ in run.model.parameters()), ops)
    destroy_parallel()
    dist.destroy_process_group()


def main():
    import socket

    counts = mp.Manager().dict()
    for n_layer in (2, 6):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_aten_ops_in_step, args=(2, port, n_layer, counts), nprocs=2, start_method="fork")
    (t0, o0), (t1, o1) = counts[2], counts[6]
    print(f"{'layers':>6} {'tensors':>8} {'aten ops in step':>17}")
    for n_layer in (2, 6):
        print(f"{n_layer:>6} {counts[n_layer][0]:>8} {counts[n_layer][1]:>17}")
    print(f"aten ops per parameter tensor: {(o1 - o0) / (t1 - t0):.1f}")


if __name__ == "__main__":
    main()
