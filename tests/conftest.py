"""Test-session setup: CI has no GPU, so Triton kernels run in Triton's interpreter.

Set before any test module imports Triton (it reads the variable when it builds its own
jitted helpers), so the kernel tests run in-process rather than in a fresh subprocess."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
