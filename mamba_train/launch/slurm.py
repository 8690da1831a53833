"""`mamba-train launch slurm`: write an sbatch script from `launch/slurm.sbatch` and submit it.

The script (see the template's header) runs one torchrun per node with c10d rendezvous
on the first node, resumes from `latest` on every start, checkpoints on USR1 120 s before
the time limit and requeues itself. `--dry-run` prints it without submitting.
`render_array_sbatch` fills the same template for a job array (`mamba-train scale`'s
sweeps): task i trains config i, with the same trap, requeue and resume.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mamba_train.config import RunConfig, load_config
from mamba_train.parallel.groups import LayoutError, validate_layout

TEMPLATE = Path(__file__).resolve().parents[2] / "launch" / "slurm.sbatch"


class LaunchError(RuntimeError):
    """A launch that cannot be written or submitted; the message says why."""


def check_layout(cfg: RunConfig, nodes: int, procs_per_node: int) -> None:
    """The run's TP × CP × DP layout for the world size this launch starts, checked here: in
    the trainers it fails only once every rank has started (on SLURM, after the queue)."""
    world = nodes * procs_per_node
    parallel = cfg.parallel
    try:
        validate_layout(cfg.model, cfg.data.seq_len, world, tp=parallel.tp, cp=parallel.cp,
                        sequence_parallel=parallel.sequence_parallel, tp_comm_overlap=parallel.tp_comm_overlap)
    except LayoutError as err:
        raise LaunchError(f"parallel layout for world size {world} = {nodes} node(s) × {procs_per_node} "
                          f"process(es) per node: {err}") from err


# sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (man sbatch), or no limit
SLURM_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|-1|(?i:unlimited|infinite)")


@dataclass
class SlurmJob:
    """What a job asks SLURM for, and where it runs: the fields of launch/slurm.sbatch that
    one run and a job array share."""

    job_name: str
    log_dir: Path
    nodes: int = 1
    gpus_per_node: int = 0  # 0: no --gpus-per-node line (CPU nodes)
    procs_per_node: int = 1  # trainer processes torchrun starts on each node
    cpus_per_task: int = 8
    time: str = "24:00:00"
    extra_sbatch: list[str] = field(default_factory=list)  # further #SBATCH lines, e.g. "--partition=gpu"
    workdir: Path = field(default_factory=Path.cwd)
    python: str = sys.executable


def render_sbatch(job: SlurmJob, config_path: str | Path, overrides: list[str] = ()) -> str:
    """The script of one run: `train CONFIG OVERRIDES --resume auto` on every start."""
    train_args = " ".join(shlex.quote(a) for a in [str(Path(config_path).resolve()), *overrides])
    return _fill_template(job, train_args, log_name="%x-%j")


# A job array's part of the template (its {task_lines}): task i trains configs[i]; the
# trainers get "$config", and everything else, the USR1 trap and the requeue included, is
# the single run's script. Braces are doubled as in the template.
ARRAY_TASK_LINES = """
{header}# array task i trains configs[i]; `sbatch --array=...` on the command line picks the tasks
configs=(
{configs})
if [ -z "${{SLURM_ARRAY_TASK_ID:-}}" ] || [ "$SLURM_ARRAY_TASK_ID" -ge "${{#configs[@]}}" ]; then
  echo "no run config for array task ${{SLURM_ARRAY_TASK_ID:-(none: not an array job)}}; this script holds ${{#configs[@]}}" >&2
  exit 2
fi
config=${{configs[$SLURM_ARRAY_TASK_ID]}}
echo "[$(date -Is)] array task $SLURM_ARRAY_TASK_ID of job ${{SLURM_ARRAY_JOB_ID:-?}}: $config"
"""


def render_array_sbatch(job: SlurmJob, configs: list[str | Path], header: str = "") -> str:
    """A job array from the same template: task i trains configs[i], and traps USR1,
    checkpoints and requeues itself (by its own job id) exactly as one run does. `header`
    (comment lines) goes above the task's choice of config."""
    if not configs:
        raise LaunchError("a job array needs at least one run config")
    quoted = "".join(f"  {shlex.quote(str(Path(c).resolve()))}\n" for c in configs)
    task_lines = ARRAY_TASK_LINES.format(header=header, configs=quoted)
    return _fill_template(job, '"$config"', log_name="%x-%A_%a", array=f"0-{len(configs) - 1}",
                          task_lines=task_lines)


def _fill_template(job: SlurmJob, train_args: str, log_name: str, array: str = "", task_lines: str = "") -> str:
    if not TEMPLATE.is_file():
        raise LaunchError(f"sbatch template {TEMPLATE} not found: run mamba-train from a clone of the repository "
                          f"(pip install -e .)")
    if job.nodes < 1 or job.procs_per_node < 1:
        raise LaunchError(f"--nodes and --procs-per-node must be >= 1, found {job.nodes} and {job.procs_per_node}")
    if not SLURM_TIME.fullmatch(job.time):
        raise LaunchError(f"--time {job.time}: expected SLURM's minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, "
                          f"D-HH:MM:SS or UNLIMITED, e.g. 24:00:00 or 2-00:00:00")
    return TEMPLATE.read_text().format(
        job_name=job.job_name, array_line=f"#SBATCH --array={array}\n" if array else "", nodes=job.nodes,
        cpus_per_task=job.cpus_per_task, time=job.time, log_dir=job.log_dir, log_name=log_name,
        gpu_line=f"#SBATCH --gpus-per-node={job.gpus_per_node}\n" if job.gpus_per_node else "",
        extra_lines="".join(f"#SBATCH {line}\n" for line in job.extra_sbatch), workdir=shlex.quote(str(job.workdir)),
        task_lines=task_lines, python=shlex.quote(job.python), procs_per_node=job.procs_per_node,
        train_args=train_args)


def sbatch_command(script_path: str | Path, options: list[str] = ()) -> list[str]:
    """Options on sbatch's command line override the script's #SBATCH lines."""
    return ["sbatch", "--parsable", *options, str(script_path)]


def submit(script_path: str | Path, options: list[str] = ()) -> str:
    """Submits the script and returns the job id (an array's id for a job array)."""
    command = sbatch_command(script_path, options)
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise LaunchError("sbatch not found: is this a SLURM login node? (--dry-run prints the script)") from err
    if done.returncode != 0:
        raise LaunchError(f"{shlex.join(command)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, as for `train`")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU-only nodes")
    parser.add_argument("--procs-per-node", type=int, help="trainer processes per node (default: gpus-per-node, "
                        "or 1 without GPUs)")
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--time", default="24:00:00", help="SLURM time limit: minutes, HH:MM:SS, D-HH:MM:SS, ...")
    parser.add_argument("--job-name", help="default: the config's file name")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="extra #SBATCH line, e.g. --sbatch=--partition=gpu (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")


def run(args: argparse.Namespace) -> int:
    if args.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node: expected 0 (CPU nodes) or more, found {args.gpus_per_node}")
    procs_per_node = args.procs_per_node if args.procs_per_node is not None else (args.gpus_per_node or 1)
    if args.nodes < 1 or procs_per_node < 1:
        raise LaunchError(f"--nodes and --procs-per-node must be >= 1, found {args.nodes} and {procs_per_node}")
    # fail here, not in the queue, on a bad config or a layout the job's processes cannot take
    cfg = load_config(args.config, args.overrides)
    check_layout(cfg, args.nodes, procs_per_node)
    run_dir = Path(cfg.logging.run_dir).resolve()
    job = SlurmJob(job_name=args.job_name or Path(args.config).stem, log_dir=run_dir / "slurm", nodes=args.nodes,
                   gpus_per_node=args.gpus_per_node, procs_per_node=procs_per_node,
                   cpus_per_task=args.cpus_per_task, time=args.time, extra_sbatch=args.sbatch)
    script = render_sbatch(job, args.config, args.overrides)
    if args.dry_run:
        print(script)
        return 0
    job.log_dir.mkdir(parents=True, exist_ok=True)
    script_path = job.log_dir / f"{job.job_name}.sbatch"
    script_path.write_text(script)
    job_id = submit(script_path)
    print(f"submitted job {job_id}: {script_path}\nlogs: {job.log_dir}/{job.job_name}-{job_id}.out")
    return 0
