"""`mamba-train launch slurm`: write an sbatch script from `launch/slurm.sbatch` and submit it.

The script (see the template's header) runs one torchrun per node with c10d rendezvous
on the first node, resumes from `latest` on every start, checkpoints on USR1 120 s before
the time limit and requeues itself. `--dry-run` prints it without submitting.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from mamba_train.config import load_config

TEMPLATE = Path(__file__).resolve().parents[2] / "launch" / "slurm.sbatch"


class LaunchError(RuntimeError):
    """A launch that cannot be written or submitted; the message says why."""


def render_sbatch(config_path: str, overrides: list[str], nodes: int, gpus_per_node: int, procs_per_node: int,
                  time: str, job_name: str, log_dir: Path, cpus_per_task: int, extra_sbatch: list[str],
                  workdir: Path, python: str = sys.executable) -> str:
    if not TEMPLATE.is_file():
        raise LaunchError(f"sbatch template {TEMPLATE} not found: run mamba-train from a clone of the repository "
                          f"(pip install -e .)")
    train_args = " ".join(shlex.quote(a) for a in [str(Path(config_path).resolve()), *overrides])
    return TEMPLATE.read_text().format(
        job_name=job_name, nodes=nodes, cpus_per_task=cpus_per_task, time=time, log_dir=log_dir,
        gpu_line=f"#SBATCH --gpus-per-node={gpus_per_node}\n" if gpus_per_node else "",
        extra_lines="".join(f"#SBATCH {line}\n" for line in extra_sbatch), workdir=shlex.quote(str(workdir)),
        python=shlex.quote(python), procs_per_node=procs_per_node, train_args=train_args)


def submit(script_path: Path) -> str:
    try:
        done = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise LaunchError("sbatch not found: is this a SLURM login node? (--dry-run prints the script)") from err
    if done.returncode != 0:
        raise LaunchError(f"sbatch {script_path} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, as for `train`")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU-only nodes")
    parser.add_argument("--procs-per-node", type=int, help="trainer processes per node (default: gpus-per-node, "
                        "or 1 without GPUs)")
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--time", default="24:00:00", help="SLURM time limit")
    parser.add_argument("--job-name", help="default: the config's file name")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="extra #SBATCH line, e.g. --sbatch=--partition=gpu (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # fail here, not in the queue, on a bad config
    procs = args.procs_per_node or args.gpus_per_node or 1
    if args.nodes < 1 or procs < 1:
        raise LaunchError(f"--nodes and --procs-per-node must be >= 1, found {args.nodes} and {procs}")
    run_dir = Path(cfg.logging.run_dir).resolve()
    job_name = args.job_name or Path(args.config).stem
    script = render_sbatch(args.config, args.overrides, args.nodes, args.gpus_per_node, procs, args.time, job_name,
                           run_dir / "slurm", args.cpus_per_task, args.sbatch, workdir=Path.cwd())
    if args.dry_run:
        print(script)
        return 0
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    script_path = run_dir / "slurm" / f"{job_name}.sbatch"
    script_path.write_text(script)
    job_id = submit(script_path)
    print(f"submitted job {job_id}: {script_path}\nlogs: {run_dir / 'slurm'}/{job_name}-{job_id}.out")
    return 0
