"""Session-wide test set-up.

The Triton kernels are tested on the CPU under Triton's interpreter, which is chosen when triton is
first imported; torch imports triton as a side effect of much of torch.distributed (pipelining,
FSDP), so any test module that imports the runtime at collection would import triton first. The
variable is therefore set here, before any test module is collected."""

import os

os.environ["TRITON_INTERPRET"] = "1"
