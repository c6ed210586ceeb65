"""Training a ladder (`scaling.ladder`): its runs one after another in this process, or one slurm
array task per size.

Every run is `train.loop.train(config, resume=True)` of its `OUT/configs/<run>.toml`: a finished
run (its last step's checkpoint exists) is skipped, a partial one resumes, a decay branch starts
from its main run's kept checkpoint, so the sweep can be stopped and started again at any point.
A size's main run trains before its branches.

Under slurm (`slurm_array_script`) array task i trains size i's runs (its main run, then its
branches) with ``stratagem scaling run OUT --size i``, which calls `run_task`. As in
`slurm/train.sbatch`, slurm signals the batch shell (``--signal=B:USR1@secs``) before the time limit;
the shell writes the task's stop file (`task_stop_file`), the run checkpoints at its next step and
the task exits, and the shell requeues the task, which resumes where it stopped.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from stratagem.errors import ConfigError
from stratagem.launcher.config import load_config
from stratagem.launcher.slurm import SAFE, SlurmJob, sbatch, sbatch_path
from stratagem.scaling.ladder import config_path, load_ladder
from stratagem.train.checkpoint import Checkpointer
from stratagem.train.loop import run_dir_of, train
from stratagem.train.metrics import read_metrics
from stratagem.train.preemption import StopSignals


@dataclass
class RunOutcome:
    name: str
    status: str  # "trained", "finished before" (skipped) or "stopped" (checkpointed before its last step)
    step: int  # the run's step when this call left it
    eval_loss: float | None  # its newest evaluation
    seconds: float  # spent on it in this call


@dataclass
class SweepSummary:
    runs: list[RunOutcome]
    seconds: float
    stopped: str | None = None  # why the sweep stopped before its last run ("time limit", "terminated")

    def table(self) -> str:
        lines = [f"{r.name:<16} {r.status:<15} step {r.step:>7}  eval loss "
                 f"{'-' if r.eval_loss is None else f'{r.eval_loss:.4f}':>7}  {r.seconds:7.1f} s" for r in self.runs]
        ending = f"stopped ({self.stopped})" if self.stopped else "done"
        return "\n".join([*lines, f"{len(self.runs)} runs, {self.seconds:.1f} s, {ending}"])


def run_ladder(out_dir: str | Path, only: list[str] | None = None, say=print, stop: StopSignals | None = None,
               progress_stream=None) -> SweepSummary:
    """Train the ladder in `out_dir` (or only the runs named in `only`) one run after another.

    Everything is checked before the first step: the run names, their configs, and that each
    branch's main run trains before it (in this call) or has finished. `stop`
    (`train.preemption.StopSignals`) ends the sweep with a checkpoint at the current run's next step.
    `progress_stream` takes the runs' progress lines (default: stderr).
    """
    began = time.perf_counter()
    ladder = load_ladder(out_dir)
    for name in only or ():
        ladder.run(name)  # an unknown name is refused
    selected = [run for run in ladder.runs if only is None or run.name in only]
    configs = {run.name: load_config(str(config_path(out_dir, run.name))) for run in selected}
    for run in selected:
        if run.branch_of and run.branch_of not in configs and not _finished(ladder.config(run.branch_of, out_dir)):
            raise ConfigError(f"run {run.name}: branches from {run.branch_of} at step {run.branch_step}; "
                              f"train {run.branch_of} first (or together with it)")
    outcomes, stopped = [], None
    for run in selected:  # in the ladder's order: each main run before its branches
        config, started = configs[run.name], time.perf_counter()
        if _finished(config):
            outcomes.append(RunOutcome(run.name, "finished before", run.steps, _eval_loss(config), 0.0))
            continue
        stopped = stop.agreed() if stop is not None else None  # asked between runs too
        if stopped:
            break
        say(f"{run.name}: {run.steps} steps" + (f", branching from {run.branch_of} at step {run.branch_step}"
                                                if run.branch_of else ""))
        result = train(config, resume=True, stop=stop, progress_stream=progress_stream)
        outcomes.append(RunOutcome(run.name, "stopped" if result.stopped else "trained", result.step, result.eval_loss,
                                   time.perf_counter() - started))
        stopped = result.stopped
        if stopped:
            break
    return SweepSummary(outcomes, time.perf_counter() - began, stopped)


def run_task(out_dir: str | Path, size: int, say=print) -> SweepSummary:
    """Slurm array task `size`: that size's runs, stopping with a checkpoint at a stop signal or
    when the task's stop file appears (the job script writes it before the time limit)."""
    runs = load_ladder(out_dir).runs_of_size(size)
    with StopSignals(stop_file=task_stop_file(out_dir, size)) as stop:
        return run_ladder(out_dir, [run.name for run in runs], say=say, stop=stop)


def task_stop_file(out_dir: str | Path, size: int) -> Path:
    """Where the job script of `slurm_array_script` asks task `size` to stop (keep the two in step)."""
    return Path(out_dir) / "slurm" / f"stop-{size}"


def _finished(config) -> bool:
    """Whether the run's last step's checkpoint exists."""
    latest = Checkpointer(run_dir_of(config) / "checkpoints").latest()
    return latest is not None and latest.name == f"step-{config.train.steps}"


def _eval_loss(config) -> float | None:
    records = read_metrics(run_dir_of(config))
    return next((r["eval_loss"] for r in reversed(records) if "eval_loss" in r), None)


ARRAY_SCRIPT = """#!/bin/bash
# A stratagem scaling ladder as a slurm job array (scaling/sweep.py): task i trains size i's runs,
# its main run, then its decay branches, each resumed from its newest complete checkpoint.
#SBATCH --job-name={{job_name}}
#SBATCH --array=0-{{last_task}}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task={{cpus_per_task}}
#SBATCH --time={{time}}
#SBATCH --signal=B:USR1@{{signal_seconds}}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={{output}}
{{extra_directives}}
set -uo pipefail
out_dir={{out_dir}}
python={{python}}
task=$SLURM_ARRAY_TASK_ID
echo "stratagem: ladder $out_dir, task $task (job ${SLURM_ARRAY_JOB_ID}_$task, restart ${SLURM_RESTART_COUNT:-0}) on $(hostname)"

# USR1 (from --signal: the time limit is near): the stop file asks the run to checkpoint at its next
# step boundary and exit; then the task is requeued and resumes. TERM (scancel) stops it for good.
stop_file="$out_dir/slurm/stop-$task"
rm -f "$stop_file"
trap 'echo "stratagem: time limit near: the run checkpoints"; echo "time limit" > "$stop_file"' USR1
trap 'echo "stratagem: terminated: the run checkpoints"' TERM

"$python" -m stratagem.launcher.cli scaling run "$out_dir" --size "$task" &
pid=$!
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done  # a trapped signal interrupts wait
wait "$pid"
status=$?
if [ "$status" -eq 0 ] && [ -f "$stop_file" ]; then
  rm -f "$stop_file"
  echo "stratagem: checkpointed before the time limit; requeueing task ${SLURM_ARRAY_JOB_ID}_$task"
  scontrol requeue "${SLURM_ARRAY_JOB_ID}_$task"
fi
exit "$status"
"""


def slurm_array_script(out_dir: str | Path, job: SlurmJob | None = None, python: str = sys.executable) -> str:
    """The sbatch script of the ladder in `out_dir`: an array of one single-process task per size,
    with `job`'s time limit, checkpoint signal, cpus, partition and account. Its output goes to
    ``OUT/slurm/<array job>_<task>.out``: create ``OUT/slurm`` before submitting it."""
    job = job or SlurmJob()
    job.validate()
    if job.world != 1:
        raise ConfigError(f"--nodes {job.nodes} x --ranks-per-node {job.ranks_per_node}: a ladder task trains "
                          f"on one process; ask for more --cpus-per-task instead")
    out_dir = Path(out_dir).resolve()
    ladder = load_ladder(out_dir)
    name, output = f"ladder-{out_dir.name}", str(out_dir / "slurm" / "%A_%a.out")
    for what, value in (("the ladder's job name", name), ("the ladder folder", output)):
        if not SAFE.fullmatch(value):
            raise ConfigError(f"{what} {value!r}: a slurm job's name and output path may hold only letters, "
                              f"digits and ._+:/@%=-")
    directives = [f"#SBATCH --{key}={getattr(job, key)}" for key in ("partition", "account") if getattr(job, key)]
    values = {"job_name": name, "last_task": ladder.sizes - 1, "cpus_per_task": job.cpus_per_task, "time": job.time,
              "signal_seconds": job.signal_seconds, "output": output, "extra_directives": "\n".join(directives),
              "out_dir": shlex.quote(str(out_dir)), "python": shlex.quote(python)}
    script = ARRAY_SCRIPT
    for key, value in values.items():
        script = script.replace("{{" + key + "}}", str(value))
    return script


def submit_ladder(out_dir: str | Path, job: SlurmJob, dry_run: bool = False, say=print) -> str | None:
    """Write `OUT/ladder.sbatch` (an array task per size) and sbatch it; the job id (None with
    `dry_run`, which prints the script and writes nothing)."""
    script = slurm_array_script(out_dir, job)
    if dry_run:
        say(script)
        return None
    out_dir = Path(out_dir).resolve()
    sbatch_path()
    (out_dir / "slurm").mkdir(exist_ok=True)
    (out_dir / "ladder.sbatch").write_text(script)
    job_id = sbatch(out_dir / "ladder.sbatch", job.sbatch_args)
    say(f"submitted array job {job_id}: {load_ladder(out_dir).sizes} tasks, one per size; output {out_dir / 'slurm'}")
    return job_id


def submit_ladder_ray(out_dir: str | Path, address: str, follow: bool = False, say=print) -> list[str]:
    """Submit one Ray job per size to the cluster at `address` (`scaling run OUT --size I`, one CPU
    each, OUT on storage the cluster sees); their submission ids. With `follow`, wait for all of
    them, printing their logs, and raise if one did not succeed."""
    from stratagem.launcher.job import SubmitError
    from stratagem.launcher.ray_jobs import connect, follow_job

    out_dir = Path(out_dir).resolve()
    ladder = load_ladder(out_dir)
    client = connect(address)
    submissions = []
    for size in range(ladder.sizes):
        entrypoint = (f"{shlex.quote(sys.executable)} -m stratagem.launcher.cli scaling run "
                      f"{shlex.quote(str(out_dir))} --size {size}")
        try:
            submissions.append(client.submit_job(entrypoint=entrypoint, entrypoint_num_cpus=1))
        except Exception as err:
            raise SubmitError(f"{address}: the job of size {size} was refused ({str(err).strip().splitlines()[0]})") \
                from None
        say(f"submitted Ray job {submissions[-1]}: size {size} of {out_dir}")
    if follow:
        for size, submission in enumerate(submissions):
            status = follow_job(client, submission, say)
            if status != "SUCCEEDED":
                raise SubmitError(f"Ray job {submission} (size {size}) ended {status}")
    return submissions
