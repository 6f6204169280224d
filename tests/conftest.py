"""Test-session settings shared by every module."""

import os

import torch

# Without a GPU, Triton kernels run in its interpreter; the variable must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
