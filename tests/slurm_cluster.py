"""A real two-node SLURM cluster on this machine for the `slurm` tests: Debian's
slurmctld, two `slurmd -N` daemons on their own ports, and munge, all as root.

Nodes n1 and n2 both resolve to 127.0.0.1; state lives in a temporary directory, and
when the test module ends its jobs are cancelled and the daemons stopped. Each cluster
takes free ports, numbers its jobs from a random first id and runs its own munged on its
own socket (slurm.conf's AuthInfo), so two test sessions on one machine, or a system
munged, do not get in each other's way. `.ci/run` installs the packages (slurmctld
slurmd slurm-client munge); without root or without them the tests skip with the reason.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue", "munged", "mungekey")


def why_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the slurm tests start slurmctld/slurmd/munge daemons and need root"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd slurm-client munge"
    return None


def started_cluster(tmp_path_factory):
    """Body of a test module's `slurm` fixture: a started cluster, cancelled and stopped
    afterwards; skips the module's slurm tests with the reason when SLURM cannot run here."""
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.munge_socket = root / "munge" / "munge.socket"
        self.ctld_port, *self.slurmd_ports = free_ports(3)
        # Jobs pick their torchrun port from their id (launch/slurm.sbatch): another session's
        # cluster numbers its jobs elsewhere, most likely.
        self.first_job_id = 1 + 100 * random.randrange(190)

    def start(self) -> None:
        for sub in ("state", "log", "spool/n1", "spool/n2", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)  # munged refuses a socket directory others can write
        host, cpus = socket.gethostname(), os.cpu_count()
        nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={cpus} State=UNKNOWN"
                          for n, p in zip(("n1", "n2"), self.slurmd_ports))
        self.conf.write_text(f"""ClusterName=mtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
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
FirstJobId={self.first_job_id}
{nodes}
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        hosts = Path("/etc/hosts").read_text()
        if "127.0.0.1 n1 n2" not in hosts:
            with open("/etc/hosts", "a") as f:
                f.write("127.0.0.1 n1 n2\n")
        if not Path("/etc/munge/munge.key").is_file() or Path("/etc/munge/munge.key").stat().st_size == 0:
            os.makedirs("/etc/munge", exist_ok=True)
            subprocess.run(["mungekey", "--create", "--force"], check=True)
        subprocess.run(["munged", "--force", "--socket", str(self.munge_socket),
                        "--pid-file", str(self.root / "munge" / "munged.pid"),
                        "--seed-file", str(self.root / "munge" / "munged.seed"),
                        "--log-file", str(self.root / "log" / "munged.log")], check=True)
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        for node in ("n1", "n2"):
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", node], check=True, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            states = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.split()
            if states and set(states) == {"idle"}:
                return
            time.sleep(1)
        raise RuntimeError(f"the test SLURM cluster did not become idle; logs in {self.root / 'log'}:\n{self.logs()}")

    def stop(self) -> None:
        """Cancels the jobs still there (slurmd would leave their processes behind), stops the
        daemons this cluster started and waits (up to 15 s) until they are gone."""
        ctld_pid = self.root / "slurmctld.pid"
        if ctld_pid.is_file() and _alive(int(ctld_pid.read_text().strip() or 0)):
            try:
                self.run("scancel", "--partition=test", check=False, timeout=15)
                deadline = time.time() + 30
                while time.time() < deadline and self.run("squeue", "-h", check=False, timeout=15).stdout.strip():
                    time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass  # a controller that does not answer: stop it anyway
        pids = []
        for name in ("slurmd-n1.pid", "slurmd-n2.pid", "slurmctld.pid", "munge/munged.pid"):
            pid_file = self.root / name
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, 15)
                pids.append(pid)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
        deadline = time.time() + 15
        while pids and time.time() < deadline:
            pids = [pid for pid in pids if _alive(pid)]
            time.sleep(0.2)

    def run(self, *command: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, env=self.env, check=check, timeout=timeout)

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

    def finish_requeued_job(self, job_id: str, restarted, timeout: float) -> str:
        """Waits until a job that requeued itself has run again and ended, and returns its
        final state (or, after `timeout` seconds, the state it is in). `restarted()` says
        whether the second run has started (e.g. its log says so). SLURM holds a requeued
        job for its requeue delay (AuthInfo's cred_expire, 120 s): this releases it at once."""
        deadline, state = time.time() + timeout, ""
        while time.time() < deadline:
            state = self.job_field(job_id, "JobState")
            if state == "PENDING":
                # slurmd refuses a job started in the same second as its revoked credential
                # ("Job credential revoked"): SLURM's own requeue delay avoids that, so must we.
                time.sleep(3)
                self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now", check=False)
            elif restarted() and state in TERMINAL_STATES:
                return state
            time.sleep(0.5)
        return state

    def array_states(self, array_id: str) -> dict[str, str]:
        """Task id (or a range of still-pending ids, e.g. "3-5") → JobState, for a job array."""
        out = self.run("scontrol", "show", "job", array_id, check=False).stdout
        states = {}
        for record in out.split("\n\n"):
            fields = dict(token.split("=", 1) for token in record.split() if "=" in token)
            if "ArrayTaskId" in fields:
                states[fields["ArrayTaskId"]] = fields.get("JobState", "")
        return states

    def logs(self) -> str:
        """The daemons' logs, for a failing test's message."""
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}"
                         for path in sorted((self.root / "log").glob("*.log")))


TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (the kernel's choice), so that clusters started by two
    test sessions at once do not collide."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
