"""Start N ranks on this machine with torch's elastic launcher (what `torchrun` runs), gloo or NCCL.

``run_local(nproc, fn, *args)`` starts ``nproc`` processes joined by a c10d rendezvous on a free
loopback port; each initialises the default process group (NCCL when it has a GPU of its own,
else gloo), runs ``fn(*args)`` and tears the group down. Their return values come back in rank
order. No restarts: when one rank fails, the elastic agent stops the others and `RankFailed`
carries the first failing rank's error (its exception's last line, the full traceback in its
``detail``); the CLI prints the first and exits non-zero.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from stratagem.errors import StratagemError


class RankFailed(StratagemError):
    """A rank of a local job raised or died; the message names the rank and its error."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_local(nproc: int, fn, *args) -> list:
    """``fn(*args)`` on ``nproc`` local ranks in a process group; their results in rank order."""
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"stratagem-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn", local_addr="127.0.0.1")
    try:
        with _environment(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))):
            results = elastic_launch(config, _rank_main)(fn, args)
    except ChildFailedError as failed:
        rank, failure = _first_failure(failed)
        message = failure.message  # a dict read from the rank's error file, or the agent's text
        if isinstance(message, dict):
            last, detail = message.get("message", "?"), message.get("extraInfo", {}).get("py_callstack", "")
        else:
            detail = str(message)
            last = next((line for line in reversed(detail.strip().splitlines()) if line.strip()), "no message")
        raise RankFailed(f"rank {rank} of {nproc} failed: {last}", detail) from None
    return [results[rank] for rank in range(nproc)]


@contextlib.contextmanager
def _environment(**values: str):
    """The ranks inherit these variables; the caller's environment is as before afterwards (the
    elastic agent also sets variables of its own in this process)."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _first_failure(failed: ChildFailedError):
    """The rank that failed first. Error files time-stamp in whole seconds, so on a tie prefer an
    error of its own over a peer's broken connection, which the first failure causes in the others."""
    def order(item):
        rank, failure = item
        text = str(failure.message)
        return failure.timestamp, "Connection reset by peer" in text or "Connection closed by peer" in text, rank

    return min(failed.failures.items(), key=order)


@record  # a rank's exception goes to an error file that the launcher reads back
def _rank_main(fn, args):
    """One rank: the process group around ``fn(*args)``."""
    gpu = torch.cuda.is_available() and torch.cuda.device_count() > int(os.environ["LOCAL_RANK"])
    if gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if gpu else "gloo")
    result = fn(*args)  # on an exception, exit at once: a teardown would wait for the others
    dist.destroy_process_group()
    return result
