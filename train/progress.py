"""Progress display: a tqdm bar on a terminal, a compact line every `log_every` steps otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


class Progress:
    def __init__(self, total_steps: int, start_step: int, log_every: int, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.total, self.start, self.log_every = total_steps, start_step, log_every
        self.started = time.perf_counter()
        self.bar = None
        if self.stream.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, file=self.stream, unit="step",
                            dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float, eval_loss: float | None = None) -> None:
        """Report that optimizer step `step` (1-based) finished with training loss `loss`."""
        if self.bar is not None:
            fields = {"loss": f"{loss:.4f}", "tok/s": _count(tokens_per_s)}
            if eval_loss is not None:
                fields["eval"] = f"{eval_loss:.4f}"
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(step - self.bar.n)
            return
        if step % self.log_every and step != self.total and eval_loss is None:
            return
        elapsed = time.perf_counter() - self.started
        left = elapsed / max(step - self.start, 1) * (self.total - step)
        line = f"step {step}/{self.total} loss {loss:.4f}"
        if eval_loss is not None:
            line += f" eval {eval_loss:.4f}"
        line += f" tok/s {_count(tokens_per_s)} left {_duration(left)}"
        print(line, file=self.stream, flush=True)

    def note(self, message: str) -> None:
        """A line between the progress reports (above the bar on a terminal)."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
