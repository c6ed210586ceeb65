"""The training loop on one process: gradient accumulation, clipping, schedule, eval, checkpoints, metrics."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from stratagem.data.pipeline import build_eval_batches, build_train_batches, data_vocab_size
from stratagem.errors import CheckpointError
from stratagem.launcher.config import Config, check_vocab, dump_toml
from stratagem.model import Transformer, count_model
from stratagem.parallel.plan import Plan, dump_plan
from stratagem.parallel.deepspeed_engine import DeepSpeedRun
from stratagem.parallel.runtime import default_plan, parallelize
from stratagem.train.engine import OneProcess
from stratagem.train.checkpoint import (Checkpointer, TrainState, check_branch_point, check_resumable,
                                        check_weights_file)
from stratagem.train.config import TrainConfig
from stratagem.train.metrics import MetricsWriter, peak_memory_bytes, read_metrics
from stratagem.train.optim import build_optimizer
from stratagem.train.progress import Progress
from stratagem.train.schedule import lr_multiplier, schedule_phase


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    loss: float | None  # training loss of the last step run in this call (None if nothing ran)
    eval_loss: float | None  # the newest evaluation of the run
    checkpoint: Path | None
    stopped: str | None = None  # why the run stopped before its last step ("time limit", "terminated")


def run_dir_of(config: Config) -> Path:
    return Path(config.run.dir) / config.run.name


def prepare_run_dir(config: Config, resume: bool) -> Path | None:
    """Check the run directory before any work: returns the checkpoint to start from, if any: the
    run's own newest, else `run.init_from` (another run's checkpoint this run branches from).

    Without `resume`, a directory that already holds a run is refused rather than overwritten. A
    run starting from `run.init_weights` has its weights file checked against the model here.
    """
    run_dir = run_dir_of(config)
    checkpoints = Checkpointer(run_dir / "checkpoints")
    latest = checkpoints.latest()
    if not resume and (latest is not None or (run_dir / "metrics.jsonl").exists()):
        held = f"checkpoint {latest.name}" if latest else "metrics.jsonl"
        raise CheckpointError(f"{run_dir}: already holds a run ({held}); pass --resume to continue it "
                              f"or choose another run.name")
    if latest is not None:
        check_resumable(latest, config.to_dict())
        return latest
    if config.run.init_from:
        init_from = Path(config.run.init_from)
        check_branch_point(init_from, config.to_dict())
        return init_from
    if config.run.init_weights:
        with torch.device("meta"):
            check_weights_file(Path(config.run.init_weights), Transformer(config.model))
    return None


def branch_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                     settings: list[dict], tc: TrainConfig, step: int) -> None:
    """Put a branch on its own schedule at `step`: the loaded optimizer carries the settings (lr,
    betas, weight decay ...) of the run it was saved by, so they go back to this config's
    (`settings`, taken before loading), and the scheduler is set to `step` of this config's schedule,
    the same state as if this run had stepped it from 0."""
    lrs = [base * lr_multiplier(tc, step) for base in scheduler.base_lrs]
    for group, own, lr in zip(optimizer.param_groups, settings, lrs):
        group.update(own, lr=lr)
    scheduler.load_state_dict({**scheduler.state_dict(), "last_epoch": step, "_last_lr": lrs})


def autocast(config: Config):
    if config.train.autocast == "bf16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(config: Config, resume: bool = False, stop_after: int | None = None,
          progress_stream=None, plan: Plan | None = None, stop=None, report=None) -> TrainResult:
    """Train `config` to `config.train.steps`, continuing from the newest checkpoint when `resume`.

    `stop_after` ends this call after that step with a checkpoint, as a time-boxed job would;
    resuming later continues exactly as if the run had not stopped. A run without checkpoints of its
    own but with `run.init_from` starts from that checkpoint of another run: its weights, optimizer
    moments, data position, RNG and step N, then steps N+1.. under this config's own schedule and
    optimizer settings (a wsd decay branched off a longer run's stable phase). In a process group, every
    rank calls it with the same `plan` (`parallel.runtime`; default: plain data parallelism,
    `default_plan`); rank 0 writes the metrics and files, all ranks write the checkpoints.
    `stop` (`train.preemption.StopSignals`) is asked after every step: once a rank has received a
    stop signal, all write a checkpoint and return with ``stopped`` set. `report(record, checkpoint)`,
    if given, is called on every rank after each checkpoint is written (Ray Train's report).
    """
    tc = config.train
    run_dir = run_dir_of(config)
    latest = prepare_run_dir(config, resume)
    if dist.is_initialized():
        dist.barrier()  # every rank has seen the run directory before rank 0 writes into it
    if config.data.kind == "mds":  # synthetic vocabularies are checked when the config loads
        check_vocab(config, data_vocab_size(config.data), "data.mds.streams (their tokenizer)")
    if tc.threads:
        torch.set_num_threads(tc.threads)

    torch.manual_seed(config.run.seed)
    model = Transformer(config.model)
    if latest is None and config.run.init_weights:  # a run's own or a branch's checkpoint overrides them
        from safetensors.torch import load_file

        model.load_state_dict(load_file(config.run.init_weights))
    if dist.is_initialized():
        plan = plan or default_plan(config, dist.get_world_size())
        if plan.engine.deepspeed:
            engine = DeepSpeedRun(model, plan, tc)
        else:
            engine = parallelize(model, plan)
        micro_batch_size, accumulation = plan.pipeline.micro_batch_size, plan.pipeline.num_micro_batches
    else:
        accumulation, micro_batch_size = tc.accumulation_steps(config.data.seq_len), tc.micro_batch_size
        engine = OneProcess(model, accumulation, functools.partial(autocast, config))
    optimizer = build_optimizer(engine.state_module, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(tc, s))
    batches = build_train_batches(config.data, micro_batch_size, accumulation, config.run.seed,
                                  global_batches=dist.is_initialized())
    held_out = build_eval_batches(config.data, tc.micro_batch_size, tc.eval_batches)  # the same set under any plan
    if dist.is_initialized():  # in micro-batches of the plan's size (`check_train_plan` checked they divide)
        held_out = list(torch.cat(held_out).split(micro_batch_size))
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints, keep_every=tc.keep_every,
                                keep_steps=tc.keep_steps)

    start = 0
    if latest is not None:
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        template = TrainState(step=0, loader=batches.state_dict(), scheduler=scheduler.state_dict())
        state = checkpointer.load(latest, engine.state_module, optimizer, template)
        batches.load_state_dict(state.loader)
        start = state.step
        if latest.parent == run_dir / "checkpoints":
            scheduler.load_state_dict(state.scheduler)
        else:  # run.init_from: another run's checkpoint
            branch_schedule(optimizer, scheduler, settings, tc, start)

    engine.start(optimizer)

    counts = count_model(config.model, config.data.seq_len)
    writer = not dist.is_initialized() or dist.get_rank() == 0
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(dump_toml(config.to_dict()))
        (run_dir / "model_counts.json").write_text(json.dumps(counts.summary(), indent=1))
        if plan is not None:
            dump_plan(plan, run_dir / "plan.json")
        if isinstance(engine, DeepSpeedRun):  # the DeepSpeed JSON it runs under
            (run_dir / "deepspeed.json").write_text(json.dumps(engine.config, indent=1) + "\n")
    metrics = MetricsWriter(run_dir, resume_step=start) if writer else None
    progress = Progress(tc.steps, start, tc.log_every, progress_stream if writer else io.StringIO())

    tokens_per_step = tc.global_batch_tokens
    loss = eval_loss = stopped = None
    checkpoint = latest
    last = min(tc.steps, stop_after) if stop_after else tc.steps
    try:
        for step in range(start + 1, last + 1):
            began = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            loss = engine.train_step(batches.next_step())
            grad_norm = engine.step(optimizer, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
            engine.after_optimizer_step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - began

            tokens_per_s = tokens_per_step / seconds
            record = {"step": step, "tokens": step * tokens_per_step, "loss": loss, "lr": lr,
                      "grad_norm": grad_norm, "step_s": seconds, "tokens_per_s": tokens_per_s,
                      "peak_memory_bytes": peak_memory_bytes(),
                      "mfu": counts.train_flops_per_token * tokens_per_s / tc.peak_flops,
                      "phase": schedule_phase(tc, step - 1)}
            record.update({f"tokens/{name}": n for name, n in batches.tokens_per_stream().items()})
            record.update(engine.moe_metrics())  # per MoE layer: load balance, drops, aux losses
            this_eval = None
            if (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps:
                this_eval = eval_loss = engine.evaluate(held_out)
                record["eval_loss"] = eval_loss
            if metrics is not None:
                metrics.log(record)
            progress.update(step, loss, tokens_per_s, this_eval)
            stopped = stop.agreed() if stop is not None and step < last else None
            if stopped:
                stop.arm_watchdog()
                progress.note(f"stopping after step {step} ({stopped}): writing a checkpoint")
            if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == last or stopped \
                    or step in checkpointer.keep_steps:
                state = TrainState(step=step, loader=batches.state_dict(), scheduler=scheduler.state_dict())
                checkpoint = checkpointer.save(step, *engine.checkpoint_state(optimizer), state, config.to_dict())
                if report is not None:
                    report(record, checkpoint)
            if stopped:
                last = step
                break
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
        batches.close()
    if eval_loss is None:
        eval_loss = next((r["eval_loss"] for r in reversed(read_metrics(run_dir)) if "eval_loss" in r), None)
    return TrainResult(run_dir=run_dir, step=max(start, last), loss=loss, eval_loss=eval_loss,
                       checkpoint=checkpoint, stopped=stopped)
