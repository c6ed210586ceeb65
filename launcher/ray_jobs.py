"""Ray: `stratagem submit ray` sends a run to a Ray cluster through Ray's job submission API, and
the job trains it with Ray Train.

The submission freezes the config and plan into ``runs/<name>/job/`` (`launcher.job`) and submits
``python -m stratagem.launcher.ray_jobs . WORKERS`` with that folder as the job's working
directory (``runtime_env``). The job's driver runs a `TorchTrainer`: ``WORKERS`` Ray Train
workers, each one rank of `train.loop.train` under the plan (gloo on CPUs), that report their
metrics and checkpoints to Ray (rank 0 hands over the checkpoint directory, which every rank has
finished writing). When a worker dies, Ray Train restarts them all (``FailureConfig``, up to
``max_failures`` times) and they resume from the run's newest complete checkpoint: the same
checkpoints every other entry point uses, on a filesystem all workers see.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from stratagem.launcher.job import SubmitError, prepare_job, remove

MAX_FAILURES = 3
FINISHED = ("SUCCEEDED", "FAILED", "STOPPED")


def submit(config, plan, address: str, workers: int, follow: bool = False, say=print) -> str:
    """Submit the run to the Ray cluster at `address` (its dashboard, e.g. http://127.0.0.1:8265); the
    submission id. With `follow`, print the job's logs until it ends and raise if it did not succeed."""
    if workers < 1:
        raise SubmitError(f"--workers {workers}: must be at least 1")
    job = prepare_job(config, plan, workers)
    client = connect(address)
    created = job.write()
    try:
        submission = client.submit_job(
            entrypoint=f"{shlex.quote(sys.executable)} -m stratagem.launcher.ray_jobs . {workers}",
            runtime_env={"working_dir": str(job.folder)})
    except Exception as err:
        remove(created)
        raise SubmitError(f"{address}: the job was refused ({_first_line(err)})") from None
    say(f"submitted Ray job {submission}: {workers} workers, run {job.run_dir}")
    if follow:
        status = follow_job(client, submission, say)
        if status != "SUCCEEDED":
            raise SubmitError(f"Ray job {submission} ended {status}")
    return submission


def connect(address: str):
    """A JobSubmissionClient of the Ray cluster at `address`; SubmitError in one line if none answers."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # ConnectionError, or Ray's RuntimeError around it
        raise SubmitError(f"{address}: no Ray cluster reachable there ({_first_line(err)})") from None


def follow_job(client, submission: str, say) -> str:
    """Print the job's logs as they grow until it ends; its final status."""
    printed = 0
    while True:
        status = str(client.get_job_status(submission).value)
        logs = client.get_job_logs(submission)
        if len(logs) > printed:
            say(logs[printed:].rstrip("\n"))
            printed = len(logs)
        if status in FINISHED:
            return status
        time.sleep(1.0)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def train_worker(job: dict) -> None:
    """One Ray Train worker: a rank of the run (Ray Train has joined the process group)."""
    import ray.train

    from stratagem.launcher.config import build_config
    from stratagem.parallel.plan import plan_from_dict
    from stratagem.train.loop import train

    config = build_config(job["config"], "the Ray job's config")
    plan = plan_from_dict(job["plan"], "the Ray job's plan")
    rank = ray.train.get_context().get_world_rank()

    def report(record: dict, checkpoint: Path | None) -> None:
        handed = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint is not None and rank == 0 else None
        ray.train.report({k: v for k, v in record.items() if isinstance(v, (int, float))}, checkpoint=handed)

    train(config, resume=True, plan=plan, report=report)


def run_trainer(job_dir: Path, workers: int) -> int:
    """The job's driver: Ray Train's TorchTrainer over `workers` CPU workers."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from stratagem.launcher.config import load_config
    from stratagem.parallel.plan import load_plan

    config = load_config(str(job_dir / "config.toml"))
    job = {"config": config.to_dict(), "plan": load_plan(job_dir / "plan.json").to_dict()}
    run_dir = Path(config.run.dir) / config.run.name
    trainer = TorchTrainer(train_worker, train_loop_config=job,
                           scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
                           torch_config=TorchConfig(backend="gloo"),
                           run_config=RunConfig(name=config.run.name, storage_path=str(run_dir / "ray"),
                                                failure_config=FailureConfig(max_failures=MAX_FAILURES)))
    result = trainer.fit()
    print(f"stratagem: {run_dir}: Ray Train finished at step {result.metrics.get('step')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_trainer(Path(sys.argv[1]), int(sys.argv[2])))
