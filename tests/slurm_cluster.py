"""A real two-node SLURM cluster on this machine for the `slurm` tests: Debian's
slurmctld, two `slurmd -N` daemons on their own ports, and munge, all as root.

Nodes n1 and n2 both resolve to 127.0.0.1; state lives in a temporary directory and the
daemons are stopped when the test session ends. `.ci/run` installs the packages
(slurmctld slurmd slurm-client munge); without root or without them the tests skip
with the reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "mungekey")


def why_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the slurm tests start slurmctld/slurmd/munge daemons and need root"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd slurm-client munge"
    return None


class SlurmCluster:
    def __init__(self, root: Path, ctld_port: int = 26817, slurmd_ports=(26818, 26819)):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.ctld_port, self.slurmd_ports = ctld_port, slurmd_ports

    def start(self) -> None:
        for sub in ("state", "log", "spool/n1", "spool/n2"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        host, cpus = socket.gethostname(), os.cpu_count()
        nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={cpus} State=UNKNOWN"
                          for n, p in zip(("n1", "n2"), self.slurmd_ports))
        self.conf.write_text(f"""ClusterName=mtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=5
MinJobAge=600
{nodes}
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        hosts = Path("/etc/hosts").read_text()
        if "127.0.0.1 n1 n2" not in hosts:
            with open("/etc/hosts", "a") as f:
                f.write("127.0.0.1 n1 n2\n")
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            os.makedirs(d, exist_ok=True)
        if not Path("/etc/munge/munge.key").is_file() or Path("/etc/munge/munge.key").stat().st_size == 0:
            subprocess.run(["mungekey", "--create", "--force"], check=True)
        if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
            subprocess.run(["munged", "--force", "--pid-file", str(self.root / "munged.pid"), "--socket",
                            "/run/munge/munge.socket.2"], check=True)
            time.sleep(1)
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        for node in ("n1", "n2"):
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", node], check=True, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            states = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.split()
            if states and set(states) == {"idle"}:
                return
            time.sleep(1)
        raise RuntimeError(f"the test SLURM cluster did not become idle; logs in {self.root / 'log'}")

    def stop(self) -> None:
        for name in ("slurmd-n1.pid", "slurmd-n2.pid", "slurmctld.pid", "munged.pid"):
            pid_file = self.root / name
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text().strip()), 15)
                except (ProcessLookupError, ValueError):
                    pass

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, env=self.env, check=check)

    def job_field(self, job_id: str, field: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for token in out.split():
            if token.startswith(field + "="):
                return token.split("=", 1)[1]
        return ""

    def wait_for_state(self, job_id: str, states: set[str], timeout: float) -> str:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} is {state or 'unknown'}, not {states}, after {timeout} s")
