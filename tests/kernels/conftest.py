"""Kernel tests: Triton runs through its interpreter when no CUDA device is present.

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before xdistill_kernels'
Triton modules are imported, so it is set here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
