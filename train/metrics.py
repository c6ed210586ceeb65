"""Per-step metrics: one JSON line per step in `metrics.jsonl` and the same scalars in TensorBoard."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter


MEASURED_KEYS = ("step_s", "tokens_per_s", "mfu", "peak_memory_bytes")  # how fast and big, not what was learnt


def without_measurements(records: list[dict]) -> list[dict]:
    """The records without `MEASURED_KEYS`: what two runs of the same training must agree on."""
    return [{k: v for k, v in r.items() if k not in MEASURED_KEYS} for r in records]


class MetricsWriter:
    """Appends to `<run>/metrics.jsonl` and `<run>/tensorboard/`.

    On resume from step N, lines for steps after N (written by the attempt that crashed after its
    last checkpoint) are dropped, and TensorBoard purges the same steps, so each step is recorded
    once, by the attempt whose state the run continued from.
    """

    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        _truncate_after(self.path, resume_step)
        self.file = self.path.open("a")
        self.tensorboard_dir = Path(run_dir) / "tensorboard"
        self.tb = SummaryWriter(str(self.tensorboard_dir), purge_step=resume_step + 1)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def peak_memory_bytes() -> int:
    """This process's peak memory so far: CUDA's peak allocation on a GPU, else the peak resident set
    (all of the process: the interpreter and libraries too, not only tensors)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated()
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes if sys.platform == "darwin" else kilobytes * 1024  # macOS reports bytes


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
