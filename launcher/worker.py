"""One rank of a job whose ranks a scheduler started itself (slurm: one task per rank).

    python -m stratagem.launcher.worker JOB_DIR

JOB_DIR holds the job's ``config.toml`` and ``plan.json`` (`stratagem submit` writes them). The
rank joins the process group from the scheduler's environment (``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID``, else torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; ``MASTER_ADDR`` and
``MASTER_PORT`` from the job script), then trains the config under the plan, resuming from the
run's newest complete checkpoint (a requeued job continues by itself), with stop signals and the
stop file ``JOB_DIR/stop`` honoured between steps (`train.preemption`). The handlers are installed before anything heavy is imported,
so that a signal during start-up is not fatal. When the run stopped for the time limit, rank 0
writes ``JOB_DIR/requeue`` for the job script to requeue the job. Exit status 0 when the run
finished or stopped, 2 with one line on bad input.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from stratagem.train.preemption import StopSignals

STOP_FILE = "stop"  # JOB_DIR/stop: the job script writes it when the time limit is near
REQUEUE_FILE = "requeue"  # JOB_DIR/requeue: rank 0 writes it when the run stopped for the time limit


def rank_environment(env=os.environ) -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process, from slurm's variables or torchrun's."""
    for rank, world, local in (("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"), ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        if rank in env and world in env:
            return int(env[rank]), int(env[world]), int(env.get(local, 0))
    raise RuntimeError("no rank in the environment (neither SLURM_PROCID/SLURM_NTASKS nor RANK/WORLD_SIZE)")


def run(job_dir: Path, stop: StopSignals) -> int:
    import torch
    import torch.distributed as dist

    from stratagem.launcher.config import load_config
    from stratagem.parallel.plan import load_plan
    from stratagem.parallel.runtime import check_train_plan
    from stratagem.train.loop import train

    config = load_config(str(job_dir / "config.toml"))
    plan = load_plan(job_dir / "plan.json")
    rank, world, local_rank = rank_environment()
    check_train_plan(config, plan, world)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    gpu = torch.cuda.is_available() and local_rank < torch.cuda.device_count()
    if gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if gpu else "gloo", init_method="env://", rank=rank, world_size=world)
    try:
        result = train(config, resume=True, plan=plan, stop=stop)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        state = f"stopped after step {result.step} ({result.stopped})" if result.stopped else f"done at step {result.step}"
        print(f"stratagem: {result.run_dir}: {state}; checkpoint {result.checkpoint}", flush=True)
    if rank == 0 and result.stopped == "time limit":
        (job_dir / REQUEUE_FILE).write_text(f"stopped after step {result.step}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m stratagem.launcher.worker JOB_DIR", file=sys.stderr)
        return 2
    job_dir = Path(args[0])
    with StopSignals(stop_file=job_dir / STOP_FILE) as stop:
        from stratagem.errors import StratagemError

        try:
            return run(job_dir, stop)
        except StratagemError as err:
            print(f"stratagem: error: {err}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
