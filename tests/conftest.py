"""Test-session settings shared by every module."""

import os

import torch
from hypothesis import HealthCheck, settings

# Without a GPU, Triton kernels run in its interpreter; the variable must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# No test may depend on the machine's speed: no time limit per example, nor on generating examples.
settings.register_profile("any-speed", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("any-speed")
