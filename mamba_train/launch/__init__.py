"""Starting training jobs: torchrun on one node, sbatch scripts on SLURM clusters."""

import argparse

from mamba_train.launch import slurm, torchrun
from mamba_train.launch.slurm import LaunchError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    launchers = parser.add_subparsers(dest="launcher", required=True, metavar="LAUNCHER")
    torchrun.add_arguments(launchers.add_parser("torchrun", help="N processes on this node through torchrun"))
    slurm.add_arguments(launchers.add_parser("slurm", help="write an sbatch script and submit it"))


def run(args: argparse.Namespace) -> int:
    return {"torchrun": torchrun.run, "slurm": slurm.run}[args.launcher](args)


__all__ = ["LaunchError", "add_arguments", "run"]
