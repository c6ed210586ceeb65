"""Session-wide test set-up.

The Triton kernels are tested on the CPU under Triton's interpreter, which is chosen when triton is
first imported; torch imports triton as a side effect of much of torch.distributed (pipelining,
FSDP), so any test module that imports the runtime at collection would import triton first. The
variable is therefore set here, before any test module is collected."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and one competing with other processes for
    the two cores made training tests several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
