"""Test-session setup: without a GPU (CI), Triton kernels run in Triton's interpreter.

Set before any test module imports Triton (it reads the variable when it builds its own
jitted helpers), so the kernel tests run in-process rather than in a fresh subprocess.
On a machine with CUDA the kernels are compiled and run on the GPU instead."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
