"""`stratagem launch`: profile this machine (cached), plan the config per layer, train on local ranks,
then hold the measured step time against the prediction and refit the profile's corrections.

Everything the run needs is checked before any process starts: the config, the run directory,
the data, and that the plan fits the batch. A resumed run keeps the plan it started with
(`runs/<name>/plan.json`); checkpoints load under any plan, so `--replan` may choose again.

Calibration (`launch.calibrate`): the median time of the steps this call ran, after the first
`WARMUP_STEPS`, against the plan's predicted terms without corrections, goes into the profile's
observations (`launcher.calibrate.record_run`); the next launch's search uses the refitted factors.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from pathlib import Path

from stratagem.launcher.config import Config

WARMUP_STEPS = 2  # first steps of a call left out of its measured step time (allocations, first collectives)


@dataclass
class Calibration:
    predicted_s: float  # the plan's step time with the profile's corrections at planning time
    measured_s: float  # median over the steps this call ran, warm-up left out
    steps: int  # steps measured
    corrections: dict[str, float]  # refitted
    observations: int  # measured runs the profile's corrections now rest on
    predicted_memory_bytes: int | None  # the plan's peak model state and activations per rank
    measured_memory_bytes: int | None  # rank 0's peak (`train.metrics.peak_memory_bytes`)

    def describe(self) -> str:
        error = self.measured_s / self.predicted_s - 1
        memory = ""
        if self.predicted_memory_bytes and self.measured_memory_bytes:
            from stratagem.model.counts import human_bytes

            memory = (f"; memory: predicted {human_bytes(self.predicted_memory_bytes)} of model states and "
                      f"activations per rank, rank 0 peaked at {human_bytes(self.measured_memory_bytes)} "
                      f"(the whole process)")
        factors = ", ".join(f"{t} {f:.2f}" for t, f in self.corrections.items() if f != 1.0) or "none"
        return (f"step time: predicted {self.predicted_s * 1000:.0f} ms, measured {self.measured_s * 1000:.0f} ms "
                f"(median of {self.steps} steps, {error:+.0%}){memory}\n"
                f"profile corrections refitted to {self.observations} measured run(s): {factors}")


@dataclass
class LaunchResult:
    train: object  # train.loop.TrainResult
    plan: object  # parallel.plan.Plan
    profile: Path
    calibration: Calibration | None  # None when no step was measured (or calibration is off)


def train_on_ranks(config: Config, plan, nproc: int, resume: bool, stop_after: int | None):
    """`train` on `nproc` local ranks under `plan`, everything checked first; rank 0's TrainResult."""
    from stratagem.launcher.local import run_local
    from stratagem.parallel.runtime import check_train_plan
    from stratagem.train.loop import prepare_run_dir

    check_train_plan(config, plan, nproc)
    prepare_run_dir(config, resume)
    return run_local(nproc, _train_rank, config, plan, resume, stop_after)[0]


def _train_rank(config: Config, plan, resume: bool, stop_after: int | None):
    from stratagem.train.loop import train

    return train(config, resume=resume, stop_after=stop_after, plan=plan)


def launch(config: Config, resume: bool = False, stop_after: int | None = None, replan: bool = False,
           force_profile: bool = False, say=print) -> LaunchResult:
    """Profile (cached), plan (or keep a resumed run's plan), train on `config.launch.ranks` local
    ranks, calibrate."""
    from stratagem.data.pipeline import data_vocab_size
    from stratagem.launcher.config import check_vocab
    from stratagem.launcher.profile import ensure_profile
    from stratagem.parallel.plan import load_plan
    from stratagem.parallel.runtime import check_train_plan
    from stratagem.train.loop import prepare_run_dir, run_dir_of

    ranks, seq_len = config.launch.ranks, config.data.seq_len
    latest = prepare_run_dir(config, resume)
    if config.data.kind == "mds":
        check_vocab(config, data_vocab_size(config.data), "data.mds.streams (their tokenizer)")
    saved_plan = run_dir_of(config) / "plan.json"
    keep_plan = latest is not None and saved_plan.is_file() and not replan
    if keep_plan:  # checked before the profile is measured
        plan = load_plan(saved_plan)
        check_train_plan(config, plan, ranks)
    profile = ensure_profile(config.model, ranks, seq_len, config.launch.profile or None, force=force_profile, say=say)
    if keep_plan:
        say(f"resuming {run_dir_of(config)} under its plan ({saved_plan}; --replan searches again)")
    else:
        plan = search_plan(config, profile, say)
        check_train_plan(config, plan, ranks)
    first_step = _step_of(latest)
    result = train_on_ranks(config, plan, ranks, resume, stop_after)
    calibration = _calibrate(config, profile, plan, result.run_dir, first_step) if config.launch.calibrate else None
    return LaunchResult(train=result, plan=plan, profile=Path(profile.source), calibration=calibration)


def workload(config: Config):
    """The cost model's view of the config: its model, sequences per step, this runtime's float32 AdamW."""
    from stratagem.launcher.cost import Workload

    return Workload.of(config.model, config.data.seq_len, config.train.global_batch_tokens // config.data.seq_len)


def search_plan(config: Config, profile, say=print):
    """The fastest per-layer plan for the config on the profiled ranks, printed with its predictions.

    Native plans only: the probes that calibrate the cost model time the native runtime, so its
    DeepSpeed terms are uncorrected here; `stratagem plan search` weighs both engines."""
    from stratagem.launcher.hardware import Measured
    from stratagem.launcher.search import Space, plan_search

    hw, ranks = Measured(profile), config.launch.ranks
    streamed = config.data.kind == "mds"  # each rank reads an equal share of every micro-batch
    result = plan_search(hw, workload(config), config.model, ranks,
                         Space(micro_batch_multiple=ranks if streamed else 1, engines=("native",)))
    corrected = f"corrections fitted to {len(profile.observations)} measured run(s)" if profile.corrections else \
        "no corrections yet: the first run calibrates"
    say(f"plan for {ranks} local ranks from {profile.source} ({corrected}):")
    say(result.report(hw, config.model.layer_specs()))
    result.plan.notes = f"stratagem launch: searched for {config.run.name} on {profile.source}"
    result.plan.source = f"the searched plan for {config.run.name}"
    return result.plan


def _step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.split("-")[-1]) if checkpoint is not None else 0


def _calibrate(config: Config, profile, plan, run_dir: Path, first_step: int) -> Calibration | None:
    """Compare this call's measured steps with the plan's prediction; record them in the profile."""
    from stratagem.launcher.calibrate import record_run, step_terms
    from stratagem.launcher.cost import predict
    from stratagem.launcher.hardware import Measured
    from stratagem.parallel.plan import summary
    from stratagem.train.metrics import read_metrics

    records = [r for r in read_metrics(run_dir) if r["step"] > first_step + WARMUP_STEPS and "step_s" in r]
    if not records:
        return None
    measured = statistics.median(r["step_s"] for r in records)
    work = workload(config)
    predicted = predict(Measured(profile), work, plan)
    raw = predict(Measured(dataclasses.replace(profile, corrections={})), work, plan)
    corrections = record_run(profile, str(run_dir), summary(plan), step_terms(raw), measured)
    profile.save(profile.source)
    return Calibration(predicted_s=predicted.step_seconds, measured_s=measured, steps=len(records),
                       corrections=corrections, observations=len(profile.observations),
                       predicted_memory_bytes=int(max(predicted.memory_per_rank)),
                       measured_memory_bytes=max((r.get("peak_memory_bytes", 0) for r in records), default=None))
