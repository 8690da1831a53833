"""Stop cleanly when the scheduler asks: SIGUSR1 (SLURM's `--signal=USR1@120` warning
before the time limit or a preemption) or SIGTERM (scancel, torchrun shutting down).

The handler only records the signal; the loop checks `requested()` at each step
boundary, saves a checkpoint and exits 0, so SLURM's requeue resumes from it. Across
ranks the flag is all-reduced (MAX), so every rank stops at the same step even when the
signal reached only some of them.

A trainer started by SLURM inherits USR1 as *ignored* (the batch script traps it to pass it
on), and the loop installs its handler only after torch, the data and the model are ready,
tens of seconds later. `catch_early()`, called by `python -m mamba_train.cli` before any heavy
import, records a stop signal from the first instant, and the StopRequest made later starts
from it. This module imports nothing heavy for that reason (torch only inside `requested`).
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_early_signals: list[int] = []


def catch_early(signals=STOP_SIGNALS) -> None:
    for signum in signals:
        signal.signal(signum, lambda received, frame: _early_signals.append(received))


class StopRequest:
    def __init__(self, signals=STOP_SIGNALS):
        self.signum: int | None = _early_signals[-1] if _early_signals else None
        self._previous = {}
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._record)

    def _record(self, signum, frame) -> None:
        self.signum = signum

    def requested(self, group=None) -> bool:
        import torch
        import torch.distributed as dist

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
