"""Operators per parameter tensor in DeepSpeed's optimizer step (ZeRO-1, bf16, TP=2 on two gloo
processes, CPU), with DeepSpeed's own per-tensor gradient checks and with ours
(`data_parallel._fuse_gradient_checks`); and in the engine's backward after train.cuda_graph's
hand-over (`ParallelRun.graph_loss`, here without a graph), which is DeepSpeed's part alone.
On a GPU the CPU launches these while the GPU waits (docs/design-notes.md), so their count per
tensor is what a rank with hundreds of gradient tensors pays each step. Counted as the
operators the step calls (a TorchDispatchMode: a multi-tensor op counts once, as it launches
once on a GPU), leaving out views, which launch nothing, at two model depths; the difference
per tensor is printed. The workers are the tests' gloo workers (tests/distributed.py).

    python bench/step_ops.py
"""

import sys
import tempfile
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from distributed import load_rank_results, run_workers, save_rank_results, tiny_batch, tiny_config  # noqa: E402

DEPTHS = (2, 6)
SEQ_LEN = 32


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_in_step(rank, world, out):
    from mamba_train.config import OptimConfig
    from mamba_train.parallel import destroy_parallel, setup_parallel

    counts = {}
    for fused in (False, True):
        for n_layer in DEPTHS:
            cfg = tiny_config(ngroups=2, n_layer=n_layer)
            run = setup_parallel(cfg, SEQ_LEN, OptimConfig(grad_clip=1.0), 1, 1, tp=2, bf16=True, seed=0)
            input_ids, labels, seq_idx = tiny_batch(cfg, 1, SEQ_LEN, [[]])
            if fused:   # train.cuda_graph's hand-over: the engine's backward is then DeepSpeed's part alone
                run.graph_loss({"input_ids": input_ids, "labels": labels, "seq_idx": seq_idx}, capture=False)
            else:       # back to DeepSpeed's own checks
                del run.engine.optimizer.has_overflow_partitioned_grads_serial, run.engine.optimizer.get_grad_norm_direct
            for _ in range(3):   # the last step is counted
                loss = run.engine(input_ids, seq_idx, labels=labels)
                with _CountOps() as in_backward:
                    run.engine.backward(loss)
                with _CountOps() as in_step:
                    run.engine.step()
            counts[f"{fused} {n_layer}"] = (sum(1 for _ in run.model.parameters()), in_step.count, in_backward.count)
            run.release_graph()
            destroy_parallel()
    save_rank_results(out, rank, counts)


def main():
    with tempfile.TemporaryDirectory() as out:
        run_workers(_ops_in_step, 2, out)
        counts = {key: tuple(value) for key, value in load_rank_results(out, 2)[0].items()}
    print(f"{'step':>16} {'layers':>6} {'tensors':>8} {'ops in step':>12} {'per tensor':>11}")
    for fused, name in ((False, "DeepSpeed's"), (True, "fused")):
        (t0, o0, _), (t1, o1, _) = (counts[f"{fused} {d}"] for d in DEPTHS)
        for depth in DEPTHS:
            tensors, ops, _ = counts[f"{fused} {depth}"]
            print(f"{name:>16} {depth:>6} {tensors:>8} {ops:>12} {(o1 - o0) / (t1 - t0):>11.1f}")
    (t0, _, b0), (t1, _, b1) = (counts[f"True {d}"] for d in DEPTHS)
    print(f"\nthe engine's backward after the hand-over (its hooks and ZeRO's reduction): {b0} and {b1} ops at "
          f"{t0} and {t1} tensors, {(b1 - b0) / (t1 - t0):.1f} per tensor")


if __name__ == "__main__":
    main()
