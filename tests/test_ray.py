"""`stratagem submit ray` against a real local Ray head (started here on 127.0.0.1, stopped at the end):
a 2-worker job through job submission, and a Ray Train worker killed mid-run that the trainer
restarts from the newest checkpoint, ending with the uninterrupted losses."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

import pytest

from stratagem.launcher.local import free_port
from stratagem.train.metrics import read_metrics
from tests.scaling_data import write_tiny_ladder

pytestmark = pytest.mark.slow
STEPS = 240
OVERRIDES = ["--model.flavor=tiny", "--data.seq_len=32", "--train.micro_batch_size=4", "--train.global_batch_tokens=256",
             f"--train.steps={STEPS}", "--train.warmup_steps=2", "--train.eval_every=0", "--train.checkpoint_every=20",
             "--train.keep_checkpoints=0", "--train.eps=1e-6"]


@pytest.fixture(scope="module")
def head():
    """A Ray head on loopback; yields (dashboard address, environment for Ray's clients)."""
    # Ray 2.60 wants token authentication for job submission: a token of this cluster's own, in the
    # environment of every Ray command and client here (nothing written under ~/.ray)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    dashboard = free_port()
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    started = subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
                              "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=4",
                              "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def submit(head, runs, name: str, *extra: str) -> tuple[list[str], dict]:
    """The CLI command that submits the run `name`, and its environment."""
    address, env = head
    return [sys.executable, "-m", "stratagem.launcher.cli", "submit", "ray", *OVERRIDES, f"--run.dir={runs}",
            f"--run.name={name}", "--address", address, "--workers", "2", *extra], env


def losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)]


def ray_train_workers() -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            if b"RayTrainWorker" in cmdline:
                found.append(int(pid))
    return found


@pytest.fixture(scope="module")
def uninterrupted(head, tmp_path_factory):
    runs = tmp_path_factory.mktemp("ray")
    command, env = submit(head, runs, "straight", "--follow")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    return runs, done


def test_a_two_worker_job_submitted_with_the_cli_succeeds(uninterrupted):
    runs, done = uninterrupted
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.startswith("submitted Ray job ")
    assert f"stratagem: {runs / 'straight'}: Ray Train finished at step {STEPS}" in done.stdout
    assert [s for s, _ in losses(runs / "straight")] == list(range(1, STEPS + 1))


def test_a_killed_worker_restarts_from_the_newest_checkpoint_and_ends_like_an_uninterrupted_run(head, uninterrupted,
                                                                                                 monkeypatch):
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):  # before Ray is imported: it reads them then
        monkeypatch.setenv(key, head[1][key])
    from ray.job_submission import JobSubmissionClient

    runs, _ = uninterrupted
    command, env = submit(head, runs, "killed")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    submission = done.stdout.split("submitted Ray job ")[1].split(":")[0]
    deadline = time.monotonic() + 600
    while len(read_metrics(runs / "killed")) < 60:
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.2)
    workers = ray_train_workers()
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    client = JobSubmissionClient(head[0])
    while str(client.get_job_status(submission).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, client.get_job_logs(submission)[-3000:]
        time.sleep(1.0)
    logs = client.get_job_logs(submission)
    assert str(client.get_job_status(submission).value) == "SUCCEEDED", logs[-3000:]
    got, want = losses(runs / "killed"), losses(runs / "straight")
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, loss), (_, expected) in zip(got, want):
        assert loss == pytest.approx(expected, rel=1e-5), f"step {step}"


def test_an_unreachable_address_is_one_line_and_submits_nothing(tmp_path):
    done = subprocess.run([sys.executable, "-m", "stratagem.launcher.cli", "submit", "ray", *OVERRIDES,
                           f"--run.dir={tmp_path}", "--run.name=nowhere", "--address", f"http://127.0.0.1:{free_port()}"],
                          env=dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "no Ray cluster reachable there" in done.stderr
    assert not (tmp_path / "nowhere").exists()


def test_a_ladder_runs_as_one_ray_job_per_size(head, tmp_path):
    """`stratagem scaling run --ray`: 2 sizes x 2 budgets, one job per size training its main run and
    its decay branch to the end."""
    address, env = head
    ladder = write_tiny_ladder(tmp_path / "ladder", "--train.threads=1")
    done = subprocess.run([sys.executable, "-m", "stratagem.launcher.cli", "scaling", "run", str(tmp_path / "ladder"),
                           "--ray", address, "--follow"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("submitted Ray job") == 2
    for run in ladder.runs:
        assert [r["step"] for r in read_metrics(tmp_path / "ladder" / "runs" / run.name)] == \
            list(range(run.branch_step + 1, run.steps + 1)), done.stdout[-3000:]
