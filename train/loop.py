"""The training loop on one process: gradient accumulation, clipping, schedule, eval, checkpoints, metrics."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from stratagem.data.pipeline import build_eval_batches, build_train_batches, data_vocab_size
from stratagem.errors import CheckpointError
from stratagem.launcher.config import Config, check_vocab, dump_toml
from stratagem.model import Transformer, count_model
from stratagem.model.moe import moe_metrics, set_aux_loss_scale, update_expert_biases
from stratagem.train.checkpoint import Checkpointer, TrainState, check_resumable
from stratagem.train.metrics import MetricsWriter, read_metrics
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


def run_dir_of(config: Config) -> Path:
    return Path(config.run.dir) / config.run.name


def prepare_run_dir(config: Config, resume: bool) -> Path | None:
    """Check the run directory before any work: returns the checkpoint to resume from, if any.

    Without `resume`, a directory that already holds a run is refused rather than overwritten.
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


def loss_fn(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


def autocast(config: Config):
    if config.train.autocast == "bf16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[torch.Tensor], config: Config) -> float:
    model.eval()
    with autocast(config):
        losses = [loss_fn(model, batch).item() for batch in batches]
    model.train()
    return sum(losses) / len(losses)


def train(config: Config, resume: bool = False, stop_after: int | None = None,
          progress_stream=None) -> TrainResult:
    """Train `config` to `config.train.steps`, continuing from the newest checkpoint when `resume`.

    `stop_after` ends this call after that step with a checkpoint, as a time-boxed job would;
    resuming later continues exactly as if the run had not stopped.
    """
    tc = config.train
    run_dir = run_dir_of(config)
    latest = prepare_run_dir(config, resume)
    if config.data.kind == "mds":  # synthetic vocabularies are checked when the config loads
        check_vocab(config, data_vocab_size(config.data), "data.mds.streams (their tokenizer)")
    if tc.threads:
        torch.set_num_threads(tc.threads)

    torch.manual_seed(config.run.seed)
    model = Transformer(config.model)
    optimizer = build_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(tc, s))
    accumulation = tc.accumulation_steps(config.data.seq_len)
    set_aux_loss_scale(model, 1 / accumulation)  # MoE auxiliary losses, scaled like the LM loss
    batches = build_train_batches(config.data, tc.micro_batch_size, accumulation, config.run.seed)
    held_out = build_eval_batches(config.data, tc.micro_batch_size, tc.eval_batches)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints)

    start = 0
    if latest is not None:
        template = TrainState(step=0, loader=batches.state_dict(), scheduler=scheduler.state_dict())
        state = checkpointer.load(latest, model, optimizer, template)
        scheduler.load_state_dict(state.scheduler)
        batches.load_state_dict(state.loader)
        start = state.step

    counts = count_model(config.model, config.data.seq_len)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dump_toml(config.to_dict()))
    (run_dir / "model_counts.json").write_text(json.dumps(counts.summary(), indent=1))
    metrics = MetricsWriter(run_dir, resume_step=start)
    progress = Progress(tc.steps, start, tc.log_every, progress_stream)

    tokens_per_step = tc.global_batch_tokens
    loss = eval_loss = None
    checkpoint = latest
    last = min(tc.steps, stop_after) if stop_after else tc.steps
    try:
        for step in range(start + 1, last + 1):
            began = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            total = 0.0
            for micro in batches.next_step():
                with autocast(config):
                    micro_loss = loss_fn(model, micro)
                (micro_loss / accumulation).backward()
                total += micro_loss.item()
            max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
            optimizer.step()
            update_expert_biases(model)  # aux-loss-free MoE balancing, from this step's expert load
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - began

            loss = total / accumulation
            tokens_per_s = tokens_per_step / seconds
            record = {"step": step, "tokens": step * tokens_per_step, "loss": loss, "lr": lr,
                      "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                      "mfu": counts.train_flops_per_token * tokens_per_s / tc.peak_flops,
                      "phase": schedule_phase(tc, step - 1)}
            record.update({f"tokens/{name}": n for name, n in batches.tokens_per_stream().items()})
            record.update(moe_metrics(model))  # per MoE layer: load balance, drops, aux losses
            this_eval = None
            if (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps:
                this_eval = eval_loss = evaluate(model, held_out, config)
                record["eval_loss"] = eval_loss
            metrics.log(record)
            progress.update(step, loss, tokens_per_s, this_eval)
            if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == last:
                state = TrainState(step=step, loader=batches.state_dict(), scheduler=scheduler.state_dict())
                checkpoint = checkpointer.save(step, model, optimizer, state, config.to_dict())
    finally:
        progress.close()
        metrics.close()
        batches.close()
    if eval_loss is None:
        eval_loss = next((r["eval_loss"] for r in reversed(read_metrics(run_dir)) if "eval_loss" in r), None)
    return TrainResult(run_dir=run_dir, step=max(start, last), loss=loss, eval_loss=eval_loss,
                       checkpoint=checkpoint)
