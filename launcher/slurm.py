"""`stratagem submit slurm`: a training run as a slurm batch job that survives its time limit.

The job (`slurm/train.sbatch`) runs one srun task per rank (``--nodes`` x ``--ranks-per-node``);
the ranks meet at the allocation's first node (`launcher.worker`). Before the time limit slurm
signals the batch shell (``--signal=B:USR1@secs``), which writes the job's stop file; the ranks
write a checkpoint at the next step boundary and exit, rank 0 leaving a requeue file, and the
shell requeues the job (``scontrol requeue``): the next start resumes from that checkpoint. ``scancel`` (SIGTERM)
also checkpoints, without requeueing. A job's files live in the run directory:
``job/config.toml`` (the resolved config), ``job/plan.json``, ``job/train.sbatch`` and
``slurm/<job id>.out``.

Values reach the script quoted: shell lines take `shlex.quote`d values, and ``#SBATCH`` lines
(which sbatch parses itself) take only values of a strict alphabet, anything else is refused
before anything is written. Extra sbatch options go to sbatch's command line as separate
arguments, never through a shell.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from stratagem.errors import ConfigError
from stratagem.launcher.job import SubmitError, prepare_job, remove

SAFE = re.compile(r"[A-Za-z0-9._+:/@%=-]+")  # what a #SBATCH value may hold
TIME = re.compile(r"(\d+-)?\d+(:\d{2}){0,2}")


@dataclass
class SlurmJob:
    nodes: int = 1
    ranks_per_node: int = 1
    cpus_per_task: int = 1
    time: str = "01:00:00"  # sbatch --time: [days-]hours:minutes:seconds, or minutes
    signal_seconds: int = 120  # the checkpoint signal comes this long before the time limit
    partition: str = ""
    account: str = ""
    sbatch_args: list[str] = field(default_factory=list)  # more sbatch options, on its command line

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node

    def validate(self) -> None:
        for key in ("nodes", "ranks_per_node", "cpus_per_task", "signal_seconds"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} {getattr(self, key)}: must be at least 1")
        if not TIME.fullmatch(self.time):
            raise ConfigError(f"--time {self.time!r}: not a slurm time ([days-]hours:minutes:seconds or minutes)")
        for key in ("partition", "account"):
            value = getattr(self, key)
            if value and not SAFE.fullmatch(value):
                raise ConfigError(f"--{key} {value!r}: may hold only letters, digits and ._+:/@%=-")


def render(job: SlurmJob, name: str, run_dir: Path, python: str = sys.executable) -> str:
    """The batch script of `job` for the run `name` in `run_dir` (absolute)."""
    output = run_dir / "slurm" / "%j.out"
    for what, value in (("run.name", name), ("the run directory", str(output))):
        if not SAFE.fullmatch(value):
            raise ConfigError(f"{what} {value!r}: a slurm job's name and output path may hold only letters, "
                              f"digits and ._+:/@%=-")
    directives = [f"#SBATCH --{key}={getattr(job, key)}" for key in ("partition", "account") if getattr(job, key)]
    values = {"job_name": name, "nodes": job.nodes, "ranks_per_node": job.ranks_per_node,
              "cpus_per_task": job.cpus_per_task, "time": job.time, "signal_seconds": job.signal_seconds,
              "output": output, "extra_directives": "\n".join(directives),
              "job_dir": shlex.quote(str(run_dir / "job")), "python": shlex.quote(python)}
    script = (resources.files("stratagem") / "slurm" / "train.sbatch").read_text()
    for key, value in values.items():
        script = script.replace("{{" + key + "}}", str(value))
    return script


def sbatch_path() -> str:
    """sbatch's path; SubmitError off a slurm login node."""
    found = shutil.which("sbatch")
    if found is None:
        raise SubmitError("sbatch: not found on PATH; submit from a slurm login node")
    return found


def sbatch(script: Path, args: list[str] = ()) -> str:
    """Submit `script`; the job id, or SubmitError with sbatch's last line of complaint."""
    done = subprocess.run([sbatch_path(), "--parsable", *args, str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        message = done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}"
        raise SubmitError(message.splitlines()[-1])
    return done.stdout.strip().split(";")[0]


def submit(config, plan, job: SlurmJob, dry_run: bool = False, say=print) -> str | None:
    """Write the job's files into the run directory and sbatch it; the job id (None with `dry_run`,
    which prints the script and writes nothing). Everything `launcher.job.prepare_job` checks is
    checked first; if sbatch refuses the job, what this call wrote goes."""
    job.validate()
    files = prepare_job(config, plan, job.world)
    script = render(job, config.run.name, files.run_dir)
    if dry_run:
        say(script)
        return None
    sbatch_path()
    created = files.write()
    if not (files.run_dir / "slurm").exists():
        created.append(files.run_dir / "slurm")
        (files.run_dir / "slurm").mkdir()
    (files.folder / "train.sbatch").write_text(script)
    try:
        job_id = sbatch(files.folder / "train.sbatch", job.sbatch_args)
    except SubmitError:
        remove(created)
        raise
    say(f"submitted job {job_id}: {job.world} ranks ({job.nodes} node(s) x {job.ranks_per_node}), run "
        f"{files.run_dir}, output {files.run_dir / 'slurm' / (job_id + '.out')}")
    return job_id
