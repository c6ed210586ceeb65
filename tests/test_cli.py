"""The installed package and its `stratagem` command."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import stratagem

STRATAGEM = shutil.which("stratagem", path=str(Path(sys.executable).parent)) or "stratagem"


def run(*args, cwd):
    return subprocess.run([STRATAGEM, *args], capture_output=True, text=True, cwd=cwd)


def test_package_maps_onto_repository_root_and_no_generic_top_level_modules(tmp_path):
    repo = Path(stratagem.__file__).parent
    assert (repo / "pyproject.toml").is_file() and (repo / "model").is_dir()
    probe = ("import importlib.util, stratagem.model, stratagem.train, stratagem.data, stratagem.launcher;"
             "print([m for m in ('model', 'data', 'train', 'launcher', 'parallel', 'kernels', 'scaling',"
             " 'errors', 'tests') if importlib.util.find_spec(m) is not None])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_model_command_prints_layer_table_and_counts(tmp_path):
    done = run("model", "llama-7b", "--seq-len", "4096", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "6.74B" in done.stdout and "attention" in done.stdout and "mlp" in done.stdout
    assert done.stdout.count("\n") > 32  # one row per layer


def test_model_command_rejects_unknown_flavor(tmp_path):
    done = run("model", "gpt-5", cwd=tmp_path)
    assert done.returncode == 2 and "'gpt-5'" in done.stderr and "llama-7b" in done.stderr


def test_config_command_prints_resolved_config(tmp_path):
    done = run("config", "demo", "--train.steps=7", "--train.warmup_steps=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "steps = 7" in done.stdout and 'flavor = "tiny"' in done.stdout


def test_train_command_runs_and_reports(tmp_path):
    args = ("train", "demo", "--train.steps=3", "--data.seq_len=32", "--train.global_batch_tokens=256",
            "--train.eval_every=0", "--train.warmup_steps=1")
    done = run(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "runs/demo/tensorboard" in done.stdout and "final eval loss" in done.stdout
    assert "step 3/3 loss" in done.stderr  # not a terminal: compact lines instead of a bar
    again = run(*args, cwd=tmp_path)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    resumed = run(*args, "--resume", cwd=tmp_path)  # a finished run resumes to nothing and reports
    assert resumed.returncode == 0 and "final eval loss" in resumed.stdout
