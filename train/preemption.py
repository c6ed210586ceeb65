"""Stopping a run cleanly when its scheduler asks: a signal only sets a flag; the training loop
looks at it between steps, every rank agrees, a checkpoint is written and the run ends, to be
resumed from that checkpoint.

- SIGUSR1, or a stop file appearing: the time limit is near. Slurm's ``--signal=B:USR1@secs``
  signals the job script, which writes the stop file that every rank looks for (a file, not a
  signal passed on, because a signal reaching a rank before its handlers are installed would kill
  it). The run should continue in a new allocation: the job's rank 0 says so in a requeue file
  (`launcher.worker`) and the job script requeues the job. (An exit status would not do: srun
  kills the other ranks of a step as soon as one exits non-zero, maybe before they are done.)
- SIGTERM (``scancel``, a preemption) and SIGINT: stop for good; a scheduler that preempts with
  requeue starts the job again itself.

If the final checkpoint hangs (a rank died, a filesystem stalls), a watchdog ends the process
after ``grace_seconds`` with `EXIT_HUNG` rather than leaving the scheduler to wait for its kill.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

EXIT_HUNG = 124
# what each signal asks for; the higher wins when ranks received different ones
REQUESTS = {signal.SIGUSR1: 1, signal.SIGTERM: 2, signal.SIGINT: 2}
REASONS = {1: "time limit", 2: "terminated"}


class StopSignals:
    """Install with ``with StopSignals() as stop:``; pass to `train.loop.train` as ``stop``."""

    def __init__(self, grace_seconds: float = 120.0, stop_file: Path | None = None):
        self.grace_seconds = grace_seconds
        self.stop_file = stop_file
        self.request = 0
        self._previous = {}

    def __enter__(self) -> StopSignals:
        for signum in REQUESTS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        self.request = max(self.request, REQUESTS[signum])

    def agreed(self) -> str | None:
        """The stop every rank takes at this step boundary (collective in a process group): the
        strongest request any rank received, or None to go on."""
        import torch  # not at import: a job installs the handlers before its heavy imports
        import torch.distributed as dist

        request = self.request
        if self.stop_file is not None and self.stop_file.exists():
            request = max(request, REQUESTS[signal.SIGUSR1])
        if dist.is_initialized():
            flag = torch.tensor(request)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            request = int(flag.item())
        return REASONS.get(request)

    def arm_watchdog(self) -> None:
        """End the process with `EXIT_HUNG` unless it finishes within the grace period."""
        timer = threading.Timer(self.grace_seconds, os._exit, args=(EXIT_HUNG,))
        timer.daemon = True
        timer.start()
