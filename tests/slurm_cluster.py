"""A real one-node Slurm cluster on this machine, for tests that submit real jobs.

    from tests.slurm_cluster import SlurmCluster, ensure_slurm_installed
    ensure_slurm_installed()
    with SlurmCluster(tmp_dir) as cluster:
        done = cluster.run("sbatch", "--parsable", "--wrap", "hostname", check=True)
        assert cluster.wait_job(done.stdout.strip(), timeout=60) == "COMPLETED"

Everything lives in the directory it is given, and every daemon is a child of this process:

    munge.key, munged.seed   a key of its own (never /etc/munge/munge.key)
    munge/munge.socket       our munged's socket; slurm.conf's AuthInfo points every slurm program at it,
                             so a system munged, if any, is neither used nor touched
    slurm.conf               one controller and one node, both named after `hostname -s` but reached at
                             127.0.0.1 on two free ports: no traffic leaves the host
    state/, spool/           slurmctld's StateSaveLocation and slurmd's SlurmdSpoolDir (job scripts)
    slurmctld.log            slurmctld's LogFile
    slurmd.log               slurmd's LogFile, which slurmstepd (the per-job step daemon) writes too
    <daemon>.out             each daemon's stdout and stderr: munged's log, and for slurmctld and slurmd a copy
                             of their log that also holds what they print before they open it (bad config)

munged runs with -F, slurmctld and slurmd with -D: in the foreground, so the pids that Popen returns are the
daemons', and stop() ends exactly those (SIGTERM, then SIGKILL) plus the job processes left behind. slurmd
leaves running jobs alone when it stops, and each slurmstepd leads a session of its own, outside slurmd's:
stop() finds our slurmstepds by the SLURM_CONF in their environment (this cluster's, from slurmd's) and ends
their sessions, which hold the job's tasks.

The node advertises ``cpus`` CPUs (4 by default, more than this machine's 2: SlurmdParameters=config_overrides
stops slurmd from draining it for that), so that a 4-task job fits without --overcommit, and the partition's
OverSubscribe=FORCE:4 lets up to 4 jobs share each of them. A requeued job may start again only after
AuthInfo's cred_expire (120 s by default, 10 s here), and then only on a pass of the main scheduling loop (the
backfill loop leaves it alone): sched_interval=1 runs it every second instead of every 60 s, so a requeued job runs
again about 11 s after `scontrol requeue`. There is no slurmdbd, hence no sacct: jobs are followed with
`scontrol show job`, which keeps finished jobs for MinJobAge (300 s).

Slurm's daemons here run as root (SlurmUser=root), so the cluster needs root.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

SLURM_COMMANDS = ("sbatch", "slurmctld", "slurmd", "munged")
FINISHED_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                             "PREEMPTED"})
_POLL_SECONDS = 0.5
_STOP_SECONDS = 10.0
# They catch SIGTERM (to pass it on to a job step through slurmctld and slurmd, gone by then): only SIGKILL ends them.
_DEAF_TO_SIGTERM = frozenset({"slurmstepd", "srun"})


def ensure_slurm_installed() -> None:
    """Install Debian's slurm-wlm and munge with apt-get unless their commands are already on PATH."""
    if _missing_commands():
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0 and ("Unable to locate package" in result.stderr
                                       or "has no installation candidate" in result.stderr):
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
            result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            raise RuntimeError(f"apt-get install slurm-wlm munge failed (exit {result.returncode}): {last}")
    if missing := _missing_commands():
        raise RuntimeError(f"slurm-wlm and munge are installed but {', '.join(missing)} not on PATH "
                           f"({os.environ.get('PATH', '')})")


def _missing_commands() -> list[str]:
    return [command for command in SLURM_COMMANDS if shutil.which(command) is None]


class SlurmCluster:
    """munged, slurmctld and one slurmd, started in ``root`` (an empty directory of ours); a context manager.

    ``cpus`` is the CPU count the node advertises, whatever the machine has; ``timeout`` bounds, in seconds,
    the wait for munged's socket and then for the node to be idle.
    """

    def __init__(self, root: Path, cpus: int = 4, timeout: float = 60.0) -> None:
        self.root = Path(root)
        self.cpus = cpus
        self.timeout = timeout
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._daemons: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """The environment for slurm commands: ours, less any SLURM_* inherited from an enclosing Slurm job
        (they would point sbatch, srun and scontrol at that job and cluster), plus SLURM_CONF."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def start(self) -> SlurmCluster:
        """Start the three daemons and wait until the node is idle; on failure, stop what was started."""
        if os.geteuid() != 0:
            raise RuntimeError("SlurmCluster runs slurmctld and slurmd as SlurmUser=root: it needs root")
        try:
            self._start_munged()
            self._write_conf()
            for daemon in ("slurmctld", "slurmd"):
                self._spawn(daemon, [daemon, "-D", "-f", str(self.conf)])
            self._wait_until(lambda: self.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle",
                             f"node {self.node} idle")
        except BaseException:
            self.stop()
            raise
        return self

    def run(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """``subprocess.run`` of a slurm command against this cluster, its output captured as text."""
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, **kwargs)

    def job_state(self, job_id: int | str) -> str:
        """The job's JobState from scontrol, e.g. PENDING, RUNNING, COMPLETED."""
        return self._job_field(job_id, "JobState")

    def restart_count(self, job_id: int | str) -> int:
        """How many times the job was requeued (scontrol's Restarts=)."""
        return int(self._job_field(job_id, "Restarts"))

    def wait_job(self, job_id: int | str, timeout: float = 60.0) -> str:
        """The job's final JobState, once it is one of FINISHED_STATES; TimeoutError past ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (state := self.job_state(job_id)) not in FINISHED_STATES:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout} s")
            time.sleep(_POLL_SECONDS)
        return state

    def stop(self) -> None:
        """End slurmd, slurmctld, the job processes they left and munged (SIGTERM, then SIGKILL); idempotent."""
        sessions = {process.pid for process in self._daemons.values()}
        for name in ("slurmd", "slurmctld"):
            if name in self._daemons:
                _terminate(self._daemons.pop(name))
        self._end_leftovers(sessions)
        if "munged" in self._daemons:
            _terminate(self._daemons.pop("munged"))

    def logs(self, lines: int = 20) -> str:
        """The last lines of what every daemon printed, for failure messages."""
        return "\n".join(f"--- {path.name}\n{_tail(path, lines)}" for path in sorted(self.root.glob("*.out")))

    def _job_field(self, job_id: int | str, field: str) -> str:
        result = self.run("scontrol", "-o", "show", "job", str(job_id))
        match = re.search(rf"(?:^|\s){field}=(\S*)", result.stdout)
        if result.returncode != 0 or match is None:
            raise RuntimeError(f"scontrol show job {job_id} has no {field}: {result.stderr.strip() or result.stdout}")
        return match.group(1)

    def _start_munged(self) -> None:
        key = self.root / "munge.key"
        # munged refuses a key that others can read: 0400, owned by us (root), the user munged runs as.
        with os.fdopen(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400), "wb") as out:
            out.write(os.urandom(1024))
        self.munge_socket.parent.mkdir(mode=0o755)
        # --force: munged refuses a socket whose parent directories are not all executable by others, and
        # pytest's temporary directories are 0700; only root, which every client here is, reaches the socket.
        # In the foreground (-F) munged logs to stderr, not to a --log-file.
        self._spawn("munged", ["munged", "-F", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={self.root / 'munged.pid'}", f"--seed-file={self.root / 'munged.seed'}"])
        self._wait_until(self.munge_socket.exists, "munged's socket")

    def _write_conf(self) -> None:
        for directory in ("state", "spool"):
            (self.root / directory).mkdir()
        ctld_port, slurmd_port = _free_ports(2)
        with open("/proc/meminfo") as meminfo:
            total_mb = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1]) // 1024
        settings = {
            "ClusterName": "stratagem-test",
            "SlurmctldHost": f"{self.node}(127.0.0.1)",
            "SlurmUser": "root",
            "AuthType": "auth/munge",
            "AuthInfo": f"socket={self.munge_socket},cred_expire=10",
            "SlurmctldPort": ctld_port,
            "SlurmdPort": slurmd_port,
            "StateSaveLocation": self.root / "state",
            "SlurmdSpoolDir": self.root / "spool",
            "SlurmctldPidFile": self.root / "slurmctld.pid",
            "SlurmdPidFile": self.root / "slurmd.pid",
            "SlurmctldLogFile": self.root / "slurmctld.log",
            "SlurmdLogFile": self.root / "slurmd.log",
            "SlurmdParameters": "config_overrides",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "SchedulerType": "sched/backfill",
            "SchedulerParameters": "sched_interval=1",
            "ReturnToService": 2,
            "JobRequeue": 1,
            "MinJobAge": 300,
            "KillWait": 10,
            "InactiveLimit": 0,
            "MpiDefault": "none",
            "MailProg": "/bin/true",  # the default, /usr/bin/mail, is not installed: slurmctld logs an error
        }
        lines = [f"{key}={value}" for key, value in settings.items()]
        # RealMemory under the machine's: a node that reports less than its configured memory is drained.
        lines.append(f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={int(total_mb * 0.9)} "
                     "State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, command: list[str]) -> None:
        """Start a daemon in its own session (which then holds what it forks), its output to <name>.out."""
        with open(self.root / f"{name}.out", "ab") as out:
            self._daemons[name] = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                                   stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def _wait_until(self, ready: Callable[[], bool], what: str) -> None:
        """Poll ``ready()`` until true; raise with the logs if a daemon exits or ``self.timeout`` passes."""
        deadline = time.monotonic() + self.timeout
        while not ready():
            for name, process in self._daemons.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {process.returncode} while waiting for {what}:\n"
                                       f"{self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {self.timeout} s:\n{self.logs()}")
            time.sleep(_POLL_SECONDS)

    def _end_leftovers(self, sessions: set[int]) -> None:
        """SIGTERM what is left in our daemons' ``sessions`` and in our slurmstepds' (job tasks, srun), then
        SIGKILL it once only processes deaf to SIGTERM remain, or after _STOP_SECONDS."""
        leftovers = self._leftovers(sessions)
        for pid in leftovers:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_SECONDS
        while any(comm not in _DEAF_TO_SIGTERM for comm in leftovers.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
            leftovers = self._leftovers(sessions)
        for pid in leftovers:
            _signal(pid, signal.SIGKILL)
        # Orphans, they stay zombies until init reaps them: wait for that, so that no `pgrep` sees them after stop().
        deadline = time.monotonic() + _STOP_SECONDS
        while any(Path(f"/proc/{pid}").exists() for pid in leftovers) and time.monotonic() < deadline:
            time.sleep(0.1)

    def _leftovers(self, sessions: set[int]) -> dict[int, str]:
        """Live processes (pid: command name) in ``sessions`` or in the session of a slurmstepd of ours."""
        marker = f"\0SLURM_CONF={self.conf}\0".encode()
        processes = _processes()
        for pid, (comm, session) in processes.items():
            if comm == "slurmstepd":
                try:
                    environ = b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    continue
                if marker in environ:
                    sessions = sessions | {session}
        return {pid: comm for pid, (comm, session) in processes.items() if session in sessions}


def _processes() -> dict[int, tuple[str, int]]:
    """Every live (not zombie) process: pid -> (command name, session id), from /proc."""
    processes = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm, _, rest = (entry / "stat").read_text().partition(" (")[2].rpartition(") ")
        except OSError:
            continue
        fields = rest.split()  # state, ppid, pgrp, session, ...
        if fields[0] != "Z":
            processes[int(entry.name)] = (comm, int(fields[3]))
    return processes


def _terminate(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _free_ports(count: int) -> list[int]:
    """Distinct ports free on the loopback now (held open together so that they differ)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _tail(path: Path, lines: int) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
