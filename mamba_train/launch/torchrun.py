"""`mamba-train launch torchrun`: one node, N trainer processes, through torchrun.

The trainers run `mamba-train train CONFIG … --resume auto`, so rerunning the same
command after a crash or a kill continues from the newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from mamba_train.config import load_config
from mamba_train.launch.slurm import LaunchError, check_layout


def torchrun_command(config: str, overrides: list[str], nproc_per_node: int, python: str = sys.executable) -> list[str]:
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc_per_node),
            "-m", "mamba_train.cli", "train", config, *overrides, "--resume", "auto"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, as for `train`")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="trainer processes (one per GPU)")
    parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")


def run(args: argparse.Namespace) -> int:
    if args.nproc_per_node < 1:
        raise LaunchError(f"--nproc-per-node: expected an integer >= 1, found {args.nproc_per_node}")
    # a bad config or a layout the processes cannot take fails before any process starts
    check_layout(load_config(args.config, args.overrides), nodes=1, procs_per_node=args.nproc_per_node)
    command = torchrun_command(args.config, args.overrides, args.nproc_per_node)
    print(shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    os.execvpe(command[0], command, env)
