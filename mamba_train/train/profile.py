"""`logging.profile_steps = [first, last]`: torch.profiler over those training steps.

Every rank records its CPU activity (and its CUDA kernels on a GPU) and writes a Chrome trace
(chrome://tracing, Perfetto) to `run_dir/profile/rank<R>-steps<first>-<last>.json`; rank 0
logs a table of what took the most time. What it is for: a step slower than it should be
(launch-bound ranks, a collective that waits, a kernel that dominates) shows where its time
goes without another script. A profiled step includes its own checkpoint save and evaluation
when it has them; the run's final save and evaluation are never recorded. A run that starts
or ends inside the window (resumed, or stopping early) profiles the steps it runs of it, and
the file names those steps.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, schedule


class StepProfiler:
    """`step()` after each completed training step; `close()` when the loop ends."""

    def __init__(self, window: tuple[int, int], start_step: int, last_step: int, run_dir: Path, rank: int,
                 device: torch.device, log: Callable[[str], None]):
        # steps start_step + 1 … last_step run in this process
        first, last = max(window[0], start_step + 1), min(window[1], last_step)
        self.prof = None
        if window[0] <= 0 or first > last:
            return   # off, or the window lies outside the steps this run takes
        self.first, self.last, self.rank, self.log, self.cuda = first, last, rank, log, device.type == "cuda"
        self.path = Path(run_dir) / "profile" / f"rank{rank}-steps{first}-{last}.json"
        # the step before the window warms the profiler up, when there is one (when there is
        # none, torch warns that the first step recorded includes the profiler's start-up: said here)
        wait = first - start_step - 1
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Profiler won't be using warmup")
            steps = schedule(wait=max(wait - 1, 0), warmup=min(wait, 1), active=last - first + 1, repeat=1)
        self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else []),
                            schedule=steps, on_trace_ready=self._write)
        self.prof.start()

    def step(self) -> None:
        if self.prof is not None:
            self.prof.step()

    def close(self) -> None:
        if self.prof is not None:
            self.prof.stop()   # a run that ends inside the window still writes what it recorded
            self.prof = None

    def _write(self, prof) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.path))
        if self.rank == 0:
            sort_by = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=sort_by, row_limit=20, max_name_column_width=60)
            self.log(f"profile of steps {self.first}-{self.last} (rank 0; every rank's trace in "
                     f"{self.path.parent}):\n{table}")
