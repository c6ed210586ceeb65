"""Stop signals (`train.preemption`) on a real worker process (`launcher.worker`): SIGUSR1 checkpoints
and asks for a requeue, SIGTERM checkpoints and stops; the run resumes to the uninterrupted losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stratagem.launcher.config import dump_toml, load_config
from stratagem.launcher.local import free_port
from stratagem.launcher.worker import REQUEUE_FILE, STOP_FILE
from stratagem.parallel.plan import dump_plan
from stratagem.parallel.runtime import default_plan
from stratagem.train.metrics import read_metrics
from stratagem.train.preemption import EXIT_HUNG

OVERRIDES = ["--model.flavor=tiny", "--data.seq_len=32", "--train.micro_batch_size=4", "--train.global_batch_tokens=256",
             "--train.steps=120", "--train.warmup_steps=2", "--train.eval_every=0", "--train.checkpoint_every=50",
             "--train.keep_checkpoints=0", "--train.eps=1e-6"]


def job(tmp_path, name: str):
    config = load_config(None, [*OVERRIDES, f"--run.dir={tmp_path}", f"--run.name={name}"])
    job_dir = tmp_path / f"{name}-job"
    job_dir.mkdir()
    (job_dir / "config.toml").write_text(dump_toml(config.to_dict()))
    dump_plan(default_plan(config, 1), job_dir / "plan.json")
    return config, job_dir


def worker_env() -> dict:
    """A one-rank job's environment, as torchrun would set it."""
    return dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")


def worker_command(job_dir) -> list[str]:
    return [sys.executable, "-m", "stratagem.launcher.worker", str(job_dir)]


def start_worker(job_dir) -> subprocess.Popen:
    return subprocess.Popen(worker_command(job_dir), env=worker_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def signal_after(worker: subprocess.Popen, run_dir, steps: int, signum: int | str) -> tuple[int, str]:
    """Send `signum` (or write the stop file when it is "stop file") once the run has logged `steps`
    steps; the worker's exit status and output."""
    deadline = time.monotonic() + 120
    while len(read_metrics(run_dir)) < steps:
        assert worker.poll() is None, worker.communicate()
        assert time.monotonic() < deadline, "the worker made no progress"
        time.sleep(0.05)
    if signum == "stop file":
        (Path(worker.args[-1]) / STOP_FILE).write_text("time limit\n")
    else:
        worker.send_signal(signum)
    out, err = worker.communicate(timeout=120)
    return worker.returncode, out + err


def losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("preemption")
    _, job_dir = job(root, "straight")
    done = subprocess.run(worker_command(job_dir), env=worker_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return losses(root / "straight")


@pytest.mark.parametrize("signum, requeue, reason", [(signal.SIGUSR1, True, "time limit"),
                                                      ("stop file", True, "time limit"),
                                                      (signal.SIGTERM, False, "terminated")])
def test_a_signal_checkpoints_at_the_next_step_and_the_run_resumes_exactly(tmp_path, uninterrupted, signum, requeue,
                                                                           reason):
    config, job_dir = job(tmp_path, "stopped")
    run_dir = tmp_path / "stopped"
    code, output = signal_after(start_worker(job_dir), run_dir, 5, signum)
    assert code == 0, output
    assert (job_dir / REQUEUE_FILE).is_file() == requeue
    stopped_at = read_metrics(run_dir)[-1]["step"]
    assert 5 <= stopped_at < 120
    assert f"stopping after step {stopped_at} ({reason}): writing a checkpoint" in output
    assert (run_dir / "checkpoints" / f"step-{stopped_at}").is_dir()  # beside the regular step-50, step-100

    for leftover in (STOP_FILE, REQUEUE_FILE):  # as the job script does before each start
        (job_dir / leftover).unlink(missing_ok=True)
    worker = start_worker(job_dir)  # the next start resumes by itself
    out, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err
    assert f"stratagem: {run_dir}: done at step 120" in out
    got = losses(run_dir)
    assert [s for s, _ in got] == [s for s, _ in uninterrupted]
    for (step, loss), (_, want) in zip(got, uninterrupted):
        assert loss == pytest.approx(want, rel=1e-5), f"step {step}"


def test_a_hung_checkpoint_is_cut_short_by_the_watchdog(tmp_path):
    script = ("import time\nfrom stratagem.train.preemption import StopSignals\n"
              "with StopSignals(grace_seconds=0.5) as stop:\n    stop.arm_watchdog()\n    time.sleep(30)\n")
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_HUNG and time.monotonic() - began < 20


def test_the_worker_refuses_bad_input_with_one_line(tmp_path):
    done = subprocess.run(worker_command(tmp_path / "absent"), env=worker_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "config.toml: config file not found" in done.stderr
