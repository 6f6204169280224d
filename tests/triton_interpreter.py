"""Triton for the kernel tests: on a machine without CUDA its interpreter runs the kernels on the CPU.

The interpreter must be switched on before triton is first imported, so the kernel test modules import
this module before anything that imports triton. When some other module imported triton first (without
it), their Triton tests skip and one test reruns the module in a fresh interpreter process instead.
"""

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

TRITON_RUNS_HERE = CUDA or type(tl.zeros).__name__ == "InterpretedFunction"
DEVICE = "cuda" if CUDA else "cpu"
NOT_HERE = "triton was imported without TRITON_INTERPRET=1; covered by test_triton_kernels_in_fresh_process"
needs_triton = pytest.mark.skipif(not TRITON_RUNS_HERE, reason=NOT_HERE)
runs_elsewhere = pytest.mark.skipif(TRITON_RUNS_HERE, reason="the Triton tests run in this process")


def rerun_in_fresh_process(test_file: str) -> None:
    """Run test_file's tests in a new interpreter with TRITON_INTERPRET=1; fail with its output if any fails."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file],
        env=dict(os.environ, TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
