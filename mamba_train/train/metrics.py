"""What the loop reports: a line on stdout every `log_every` steps (or a progress bar on
a terminal), TensorBoard scalars, and `metrics.jsonl` (one JSON object per step) that
tests and plots read back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mamba_train.config import LoggingConfig

def peak_flops(device: torch.device, configured: float) -> float | None:
    """The FLOP/s that MFU divides by: logging.peak_flops when set, else the bf16 matmul rate
    measured on this GPU (issue 9's definition, shared with bench/bench_train.py); None on CPU."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    return measured_matmul_peak(device)


def measured_matmul_peak(device: torch.device, size: int = 8192, repeats: int = 20) -> float:
    """Median bf16 rate of a (size × size)·(size × size) matmul, in FLOP/s (about a second)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * size ** 3 / sorted(times)[len(times) // 2]


class MetricsLogger:
    def __init__(self, cfg: LoggingConfig, total_steps: int, start_step: int):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self.tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(self.run_dir / "tensorboard", purge_step=start_step)
        show_bar = cfg.progress_bar == "on" or (cfg.progress_bar == "auto" and sys.stderr.isatty())
        self.bar = None
        if show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log_step(self, step: int, metrics: dict) -> None:
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(f"train/{key}", value, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        if step % self.cfg.log_every == 0:
            self.info(format_metrics(step, metrics))

    def log_eval(self, step: int, results: dict) -> None:
        overall = results["overall"]
        if self.tb is not None:
            for key in ("loss", "bpb"):
                if key in overall:  # a parallel run's windowed valid loss has no bits-per-byte
                    self.tb.add_scalar(f"valid/{key}", overall[key], step)
        line = f"step {step:>6} | valid loss {overall['loss']:.4f} | ppl {overall['ppl']:.2f}"
        line += f" | bpb {overall['bpb']:.4f}" if "bpb" in overall else ""
        # the periodic evaluations score train.eval_batches' worth, the final one the whole split:
        # the token count says which figures compare
        self.info(line + (f" | {overall['tokens']:,} tokens" if "tokens" in overall else ""))

    def info(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def format_metrics(step: int, m: dict) -> str:
    parts = [f"step {step:>6}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}", f"grad-norm {m['grad_norm']:.3f}",
             f"{m['tokens_per_s']:,.0f} tok/s"]
    if "mfu" in m:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    if "peak_mem_gib" in m:
        parts.append(f"mem {m['peak_mem_gib']:.1f} GiB")
    return " | ".join(parts)


class SilentMetrics:
    """What ranks other than 0 log: nothing (one line per step, from rank 0 only)."""

    def log_step(self, step: int, metrics: dict) -> None:
        pass

    def log_eval(self, step: int, results: dict) -> None:
        pass

    def info(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass
