"""Test-session setup: without a GPU (CI), Triton kernels run in Triton's interpreter.

Set before any test module imports Triton (it reads the variable when it builds its own
jitted helpers), so the kernel tests run in-process rather than in a fresh subprocess.
On a machine with CUDA the kernels are compiled and run on the GPU instead."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: CI's 2 cores are shared with other jobs, and the
    model-level tests run several times faster on one thread there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
