"""Stop cleanly when the scheduler asks: SIGUSR1 (SLURM's `--signal=USR1@120` warning
before the time limit or a preemption) or SIGTERM (scancel, torchrun shutting down).

The handler only records the signal; the loop checks `requested()` at each step
boundary, saves a checkpoint and exits 0, so SLURM's requeue resumes from it. Across
ranks the flag is all-reduced (MAX), so every rank stops at the same step even when the
signal reached only some of them.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    def __init__(self, signals=STOP_SIGNALS):
        self.signum: int | None = None
        self._previous = {}
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._record)

    def _record(self, signum, frame) -> None:
        self.signum = signum

    def requested(self, group=None) -> bool:
        flag = self.signum is not None
        if dist.is_available() and dist.is_initialized():
            backend_device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
            tensor = torch.tensor([int(flag)], device=backend_device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
            flag = bool(tensor.item())
        return flag

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a stop request from another rank"

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
