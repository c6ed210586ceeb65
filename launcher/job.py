"""What a scheduler's job runs: the run's config and plan, frozen into ``runs/<name>/job/`` when it
is submitted (`stratagem submit slurm|ray`), after every check that can be made on the submitting
machine. The config's run directory is written as an absolute path, so that ranks started in any
working directory (a Ray job's is a copy of the job folder) find the same run.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

from stratagem.errors import ConfigError, StratagemError


class SubmitError(StratagemError):
    """The scheduler refused the job (its own message), or could not be reached."""


@dataclass
class Job:
    config: object  # launcher.config.Config, run.dir absolute
    plan: object  # parallel.plan.Plan
    run_dir: Path
    config_text: str

    @property
    def folder(self) -> Path:
        return self.run_dir / "job"

    def write(self) -> list[Path]:
        """Write config.toml and plan.json; the folders this created (for `remove` if the submission fails)."""
        from stratagem.parallel.plan import dump_plan

        created = [d for d in (self.run_dir, self.folder) if not d.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "config.toml").write_text(self.config_text)
        dump_plan(self.plan, self.folder / "plan.json")
        return created


def prepare_job(config, plan, world: int) -> Job:
    """Check everything a job of `config` under `plan` on `world` ranks needs before it is submitted:
    a run directory, the plan against the model, world and batch, and a run directory that holds
    neither another model's checkpoints nor another config's job."""
    from stratagem.launcher.config import dump_toml
    from stratagem.parallel.runtime import check_train_plan
    from stratagem.train.loop import prepare_run_dir, run_dir_of

    if not config.run.dir:
        raise ConfigError("run.dir is empty: a job needs a run directory for its checkpoints and output")
    check_train_plan(config, plan, world)
    prepare_run_dir(config, resume=True)  # another model's checkpoints: refused here
    run_dir = run_dir_of(config).resolve()
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=str(run_dir.parent)))
    job = Job(config=config, plan=plan, run_dir=run_dir, config_text=dump_toml(config.to_dict()))
    held = job.folder / "config.toml"
    if held.is_file() and held.read_text() != job.config_text:
        raise ConfigError(f"{held}: the run directory belongs to a job of another config; choose another "
                          f"run.name, or delete {job.folder} to start this config there")
    return job


def remove(created: list[Path]) -> None:
    for folder in created:
        shutil.rmtree(folder, ignore_errors=True)
