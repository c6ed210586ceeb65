"""What every scheduler's job is checked for before it is submitted (`launcher.job`), and the slurm
script's quoting (`launcher.slurm.render`), without a scheduler."""

from __future__ import annotations

import pytest

from stratagem.errors import CheckpointError, ConfigError
from stratagem.launcher.cli import main
from stratagem.launcher.config import load_config
from stratagem.launcher.job import prepare_job
from stratagem.launcher.slurm import SlurmJob, render
from stratagem.parallel.runtime import default_plan
from stratagem.train.loop import train

OVERRIDES = ["--model.flavor=tiny", "--data.seq_len=32", "--train.micro_batch_size=4", "--train.global_batch_tokens=256",
             "--train.steps=2", "--train.warmup_steps=1", "--train.eval_every=0"]


def config_of(tmp_path, *extra):
    return load_config(None, [*OVERRIDES, f"--run.dir={tmp_path}", "--run.name=run", *extra])


def test_the_job_config_holds_the_run_directory_as_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, [*OVERRIDES, "--run.dir=runs", "--run.name=run"])
    job = prepare_job(config, default_plan(config, 2), 2)
    assert job.run_dir == tmp_path / "runs" / "run" and job.config.run.dir == str(tmp_path / "runs")
    assert not (tmp_path / "runs").exists()  # nothing written before the submission
    job.write()
    assert load_config(str(job.folder / "config.toml")).run.dir == str(tmp_path / "runs")


def test_a_run_directory_of_another_config_or_model_is_refused(tmp_path):
    config = config_of(tmp_path)
    prepare_job(config, default_plan(config, 2), 2).write()
    other = config_of(tmp_path, "--train.lr=1e-4")
    with pytest.raises(ConfigError, match="the run directory belongs to a job of another config"):
        prepare_job(other, default_plan(other, 2), 2)

    trained = config_of(tmp_path / "trained")
    train(trained)
    wider = config_of(tmp_path / "trained", "--model.dim=128", "--model.ffn_hidden=384")
    with pytest.raises(CheckpointError, match="holds another run's checkpoint"):
        prepare_job(wider, default_plan(wider, 2), 2)


def test_a_job_needs_a_run_directory_and_a_plan_for_its_ranks(tmp_path):
    config = config_of(tmp_path, "--run.dir=")
    with pytest.raises(ConfigError, match="run.dir is empty"):
        prepare_job(config, default_plan(config, 2), 2)
    config = config_of(tmp_path)
    with pytest.raises(ConfigError):
        prepare_job(config, default_plan(config, 2), 4)


def test_the_script_quotes_shell_values_and_refuses_unsafe_directives(tmp_path):
    script = render(SlurmJob(nodes=2, ranks_per_node=4, partition="gpu"), "run", tmp_path / "run",
                    python="/opt/py $(env)/bin/python")
    assert f"job_dir={tmp_path}/run/job\n" in script and "python='/opt/py $(env)/bin/python'" in script
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=4" in script and "#SBATCH --partition=gpu" in script
    assert "{{" not in script
    for name, run_dir in (("run;reboot", tmp_path), ("run", tmp_path / "my run")):  # #SBATCH lines: no quoting
        with pytest.raises(ConfigError, match="a slurm job's name and output path may hold only"):
            render(SlurmJob(), name, run_dir)
    with pytest.raises(ConfigError, match="--time '1 day': not a slurm time"):
        SlurmJob(time="1 day").validate()


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path, capsys):
    assert main(["submit", "slurm", *OVERRIDES, f"--run.dir={tmp_path}", "--run.name=dry", "--ranks-per-node", "2",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and "#SBATCH --signal=B:USR1@120" in out
    assert not (tmp_path / "dry").exists()
