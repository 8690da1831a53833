"""Operators per parameter tensor in DeepSpeed's optimizer step (ZeRO-1, bf16, TP=2 on two gloo
processes, CPU), with DeepSpeed's own per-tensor gradient checks and with ours
(`data_parallel._fuse_gradient_checks`); and in the engine's backward after train.cuda_graph's
hand-over (`ParallelRun.graph_loss`, here without a graph), which is DeepSpeed's part alone. On a GPU the CPU launches these while the GPU waits
(docs/design-notes.md), so their count per tensor is what a rank with hundreds of gradient
tensors pays each step. Counted as the operators the step calls (a TorchDispatchMode: a
multi-tensor op counts once, as it launches once on a GPU), leaving out views, which launch
nothing, over one `engine.step()` at two model depths; the difference per tensor is printed.

    python bench/step_ops.py
"""

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEPTHS = (2, 6)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_in_step(rank, world, port, n_layer, fused, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from mamba_train.config import ModelConfig, OptimConfig
    from mamba_train.parallel import destroy_parallel, setup_parallel

    cfg = ModelConfig(d_model=16, n_layer=n_layer, d_state=8, d_conv=4, expand=2, headdim=8, ngroups=2, chunk_size=8,
                      vocab_size=50)
    run = setup_parallel(cfg, 32, OptimConfig(grad_clip=1.0), 1, 1, tp=2, bf16=True, seed=0)
    if not fused:   # back to DeepSpeed's own methods
        del run.engine.optimizer.has_overflow_partitioned_grads_serial, run.engine.optimizer.get_grad_norm_direct
    ids = torch.randint(0, 50, (1, 33), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "seq_idx": torch.zeros(1, 32, dtype=torch.int32)}
    if fused:   # train.cuda_graph's hand-over (without the graph): the engine's backward is DeepSpeed's part alone
        run.graph_loss(batch, capture=False)
    for _ in range(3):   # the last step is counted
        loss = run.engine(batch["input_ids"], batch["seq_idx"], labels=batch["labels"])
        with _CountOps() as in_backward:
            run.engine.backward(loss)
        with _CountOps() as in_step:
            run.engine.step()
    if rank == 0:
        out[(n_layer, fused)] = (sum(1 for _ in run.model.parameters()), in_step.count, in_backward.count)
    run.release_graph()
    destroy_parallel()
    dist.destroy_process_group()


def main():
    counts = mp.Manager().dict()
    for fused in (False, True):
        for n_layer in DEPTHS:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.start_processes(_ops_in_step, args=(2, port, n_layer, fused, counts), nprocs=2, start_method="fork")
    print(f"{'step':>16} {'layers':>6} {'tensors':>8} {'ops in step':>12} {'per tensor':>11}")
    for fused, name in ((False, "DeepSpeed's"), (True, "fused")):
        (t0, o0, _), (t1, o1, _) = (counts[(d, fused)] for d in DEPTHS)
        for depth in DEPTHS:
            tensors, ops, _ = counts[(depth, fused)]
            print(f"{name:>16} {depth:>6} {tensors:>8} {ops:>12} {(o1 - o0) / (t1 - t0):>11.1f}")
    (t0, _, b0), (t1, _, b1) = (counts[(d, True)] for d in DEPTHS)
    print(f"\nthe engine's backward after the hand-over (its hooks and ZeRO's reduction): {b0} and {b1} ops at "
          f"{t0} and {t1} tensors, {(b1 - b0) / (t1 - t0):.1f} per tensor")


if __name__ == "__main__":
    main()
