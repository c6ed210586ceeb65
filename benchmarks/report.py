"""What every benchmark writes: its result and the machine it ran on, as JSON (and to stdout).

Benchmarks are run as scripts (``python benchmarks/NAME.py``), so this module is imported by its
file name from the scripts' own folder.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine(**extra) -> dict:
    """CPU count, intra-op threads, torch and Python versions, the 1-minute load average, plus ``extra``."""
    import torch

    return {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "processor": platform.machine(),
            "load_average_1min": round(os.getloadavg()[0], 2), **extra}


def write(result: dict, out: str | Path, echo: bool = True) -> None:
    """Write ``result`` as indented JSON to ``out`` (creating its folder); print it unless ``echo`` is off."""
    text = json.dumps(result, indent=1) + "\n"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    if echo:
        print(text, end="")
