"""`stratagem submit slurm` against a real one-node slurm cluster started here (`tests/slurm_cluster.py`):
a 2-rank job to completion, a job at its time limit that checkpoints, requeues itself and ends
with the uninterrupted losses, and scancel leaving a loadable checkpoint; bad input refused."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from stratagem.launcher.config import load_config
from stratagem.train.loop import train
from stratagem.train.metrics import read_metrics
from tests.scaling_data import write_tiny_ladder
from tests.slurm_cluster import SlurmCluster, ensure_slurm_installed

pytestmark = pytest.mark.slow
STEPS = 400  # about a minute on 2 ranks here: longer than the time limit's signal takes to come
OVERRIDES = ["--model.flavor=tiny", "--data.seq_len=64", "--train.micro_batch_size=8", "--train.global_batch_tokens=1024",
             "--train.warmup_steps=5", "--train.eval_every=0", "--train.checkpoint_every=100",
             "--train.keep_checkpoints=0", "--train.eps=1e-6"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ensure_slurm_installed()
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def submit(cluster, runs, name: str, *options: str, steps: int = STEPS) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stratagem.launcher.cli", "submit", "slurm", *OVERRIDES,
                           f"--train.steps={steps}", f"--run.dir={runs}", f"--run.name={name}",
                           "--ranks-per-node", "2", *options], env=cluster.env, capture_output=True, text=True,
                          timeout=120)


def job_id(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout.split("submitted job ")[1].split(":")[0]


def output(runs, name: str, job: str) -> str:
    return (runs / name / "slurm" / f"{job}.out").read_text()


def losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def finished(cluster, runs):
    """An uninterrupted job and one whose time limit (2 min, signal 100 s before) cuts it, side by side."""
    straight = job_id(submit(cluster, runs, "straight", "--time", "10"))
    limited = job_id(submit(cluster, runs, "limited", "--time", "2", "--signal-seconds", "100"))
    states = {name: cluster.wait_job(job, timeout=900) for name, job in (("straight", straight), ("limited", limited))}
    return {"states": states, "jobs": {"straight": straight, "limited": limited}}


def test_a_two_rank_job_trains_to_completion(finished, runs):
    assert finished["states"]["straight"] == "COMPLETED", output(runs, "straight", finished["jobs"]["straight"])
    log = output(runs, "straight", finished["jobs"]["straight"])
    assert f"stratagem: {runs / 'straight'}: done at step {STEPS}" in log
    assert [step for step, _ in losses(runs / "straight")] == list(range(1, STEPS + 1))
    assert (runs / "straight" / "checkpoints" / f"step-{STEPS}").is_dir()


def test_a_job_at_its_time_limit_checkpoints_requeues_and_ends_like_an_uninterrupted_one(finished, cluster, runs):
    job = finished["jobs"]["limited"]
    log = output(runs, "limited", job)
    assert finished["states"]["limited"] == "COMPLETED", log
    assert cluster.restart_count(job) >= 1
    assert "stratagem: time limit near: the ranks checkpoint" in log
    assert f"stratagem: checkpointed before the time limit; requeueing job {job}" in log
    assert f"done at step {STEPS}" in log
    got, want = losses(runs / "limited"), losses(runs / "straight")
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, loss), (_, expected) in zip(got, want):
        assert loss == pytest.approx(expected, rel=1e-5), f"step {step}"


def test_scancel_leaves_the_newest_checkpoint_loadable(cluster, runs):
    job = job_id(submit(cluster, runs, "cancelled", "--time", "10", steps=100_000))
    deadline = time.monotonic() + 300
    while len(read_metrics(runs / "cancelled")) < 3:
        assert time.monotonic() < deadline and cluster.job_state(job) in ("PENDING", "RUNNING"), cluster.logs()
        time.sleep(0.5)
    cluster.run("scancel", job, check=True)
    assert cluster.wait_job(job, timeout=120) == "CANCELLED"
    checkpoints = sorted((runs / "cancelled" / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
    newest = checkpoints[-1]
    assert not newest.name.endswith(".partial")
    assert f"stopping after step {newest.name[5:]} (terminated)" in output(runs, "cancelled", job)
    step = int(newest.name[5:])
    config = load_config(None, [*OVERRIDES, f"--train.steps={step + 1}", f"--run.dir={runs}", "--run.name=cancelled"])
    assert train(config, resume=True).step == step + 1  # one process loads the 2-rank checkpoint and goes on


def test_bad_input_is_refused_before_anything_is_submitted(cluster, runs):
    refused = submit(cluster, runs, "bad", "--sbatch-arg=--partition=nowhere")
    assert refused.returncode == 2 and refused.stderr.startswith("stratagem: error: ")
    assert refused.stderr.count("\n") == 1 and "Invalid partition name specified" in refused.stderr  # sbatch's own words
    assert not (runs / "bad").exists()  # what the submission wrote is gone
    env = dict(cluster.env, PATH="/nonexistent")
    missing = subprocess.run([sys.executable, "-m", "stratagem.launcher.cli", "submit", "slurm", *OVERRIDES,
                              f"--run.dir={runs}", "--run.name=nosbatch"], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "sbatch: not found on PATH" in missing.stderr


def test_a_ladder_trains_as_an_array_job_one_task_per_size(cluster, tmp_path):
    """`stratagem scaling run --slurm`: 2 sizes x 2 budgets as a 2-task array; each task trains its
    size's main run and decay branch to the end."""
    ladder = write_tiny_ladder(tmp_path / "ladder", "--train.threads=1")
    done = subprocess.run([sys.executable, "-m", "stratagem.launcher.cli", "scaling", "run", str(tmp_path / "ladder"),
                           "--slurm", "--time", "10"], env=cluster.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    array = done.stdout.split("submitted array job ")[1].split(":")[0]
    states = [cluster.wait_job(f"{array}_{task}", timeout=600) for task in range(2)]
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "ladder" / "slurm").glob("*.out")))
    assert states == ["COMPLETED", "COMPLETED"], logs
    for run in ladder.runs:
        assert [r["step"] for r in read_metrics(tmp_path / "ladder" / "runs" / run.name)] == \
            list(range(run.branch_step + 1, run.steps + 1)), logs
