"""Run a function on N real processes joined in a gloo process group: the harness of multi-rank tests.

    from tests.distributed import run_ranks
    results = run_ranks(4, scenario, data_dir)     # scenario(rank, world_size, data_dir) on every rank

Each rank is a fresh interpreter (this file run as a script) with the environment torchrun would
give it: MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE (one node) and OMP_NUM_THREADS sharing the cores. It initialises gloo, runs
``fn(rank, world_size, *args)``, waits for the others, tears the group down and sends back the
return value (which must pickle). ``fn`` must be a module-level function: the rank imports its
module by name, or from its file when the name is not importable (pytest's importlib mode).

Start-up (importing torch, and streaming where used) costs seconds per process: let one launch
run a list of scenarios and return all their results. On the first failing rank, the others
(and their children, e.g. DataLoader workers) are killed and RankError carries that rank's
traceback; past ``timeout`` seconds every rank is killed and TimeoutError says which were
still running. A rank whose result was sent counts as done even if its interpreter then
crashes on exit (some libraries do), which is reported neither as success nor failure of fn.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

_POLL_SECONDS = 0.05


class RankError(RuntimeError):
    """A rank raised (its traceback is the message) or died without a result."""


def run_ranks(world_size: int, fn, *args, timeout: float = 120) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; their return values in rank order."""
    module = sys.modules[fn.__module__]
    job = {"module": fn.__module__, "file": getattr(module, "__file__", None), "name": fn.__qualname__,
           "args": args}
    with tempfile.TemporaryDirectory(prefix="ranks-") as tmp:
        work = Path(tmp)
        # sys.path goes first, on its own: unpickling the arguments may import from it
        (work / "job.pkl").write_bytes(pickle.dumps((sys.path, pickle.dumps(job))))
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world_size),
                   LOCAL_WORLD_SIZE=str(world_size))
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
        ranks = []
        for rank in range(world_size):
            with open(work / f"{rank}.log", "wb") as log:
                ranks.append(subprocess.Popen(
                    [sys.executable, __file__, str(work), str(rank)], stdout=log, stderr=subprocess.STDOUT,
                    env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), start_new_session=True))
        try:
            _wait(ranks, work, timeout)
        finally:
            for process in ranks:
                _kill_group(process)
        return [pickle.loads((work / f"{rank}.result").read_bytes()) for rank in range(world_size)]


def _wait(ranks: list[subprocess.Popen], work: Path, timeout: float) -> None:
    """Until every rank sent its result; raise for the first rank that failed (earliest error)."""
    deadline, size = time.monotonic() + timeout, len(ranks)
    while True:
        errors = sorted(work.glob("*.error"), key=lambda path: path.stat().st_mtime_ns)
        if errors:
            raise RankError(f"rank {errors[0].stem} of {size} failed:\n{errors[0].read_text()}")
        missing = [rank for rank in range(size) if not (work / f"{rank}.result").exists()]
        for rank in missing:
            if ranks[rank].poll() is not None and not (work / f"{rank}.result").exists():
                raise RankError(f"rank {rank} of {size} exited with status {ranks[rank].returncode} without a "
                                f"result; its output ends:\n{_tail(work / f'{rank}.log')}")
        if not missing:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks {missing} of {size} still running after {timeout} s; rank "
                               f"{missing[0]}'s output ends:\n{_tail(work / f'{missing[0]}.log')}")
        time.sleep(_POLL_SECONDS)
    for process in ranks:  # let them exit by themselves (streaming unlinks its shared memory at exit)
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the rank's process group (it leads its own session), e.g. its DataLoader workers."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _resolve(job: dict):
    """The job's function: import its module by name, else load it from its file under that name."""
    name = job["module"]
    try:
        module = importlib.import_module(name)
    except ImportError:
        package = name.rpartition(".")[0]
        if package and package not in sys.modules:  # e.g. `tests`, a folder without __init__.py
            holder = types.ModuleType(package)
            holder.__path__ = [str(Path(job["file"]).parent)]
            sys.modules[package] = holder
        spec = importlib.util.spec_from_file_location(name, job["file"])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    target = module
    for part in job["name"].split("."):
        target = getattr(target, part)
    return target


def _rank_main(work: Path, rank: int) -> None:
    import torch.distributed as dist

    sys_path, payload = pickle.loads((work / "job.pkl").read_bytes())
    sys.path[:] = sys_path
    world_size = int(os.environ["WORLD_SIZE"])
    try:
        job = pickle.loads(payload)
        fn = _resolve(job)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *job["args"])
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        partial = work / f"{rank}.error.tmp"
        partial.write_text(traceback.format_exc())
        partial.rename(work / f"{rank}.error")
        raise SystemExit(1)
    partial = work / f"{rank}.result.tmp"
    partial.write_bytes(pickle.dumps(result))
    partial.rename(work / f"{rank}.result")


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]), int(sys.argv[2]))
