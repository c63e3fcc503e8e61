"""The arithmetic and source handling inside two benchmark scripts (their GPU parts run only on the device).

``benchmarks/tunstall_rate.py`` decides a design question from exact code-tree sums: checked here against closed
forms.  ``benchmarks/gemv_timeline.py`` instruments a copy of the library's GEMV kernel by inserting probes at
anchor lines: checked here that every anchor still exists in the current kernel source.
"""

from __future__ import annotations

import importlib
import math
import os
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


@pytest.fixture
def bench_module(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    monkeypatch.setattr(sys, "argv", ["pytest"])
    return importlib.import_module


def test_tunstall_expected_length_matches_closed_forms(bench_module):
    tr = bench_module("tunstall_rate")
    # uniform source over 4 symbols, 64 words: all strings of length 3, no redundancy
    assert tr.tunstall_expected_length(np.full(4, 0.25), 64) == pytest.approx(3.0)
    # binary source (0.9, 0.1), 3 words: leaves 00, 01, 1 -> E[len] = 0.81 * 2 + 0.09 * 2 + 0.1 * 1
    assert tr.tunstall_expected_length(np.array([0.9, 0.1]), 3) == pytest.approx(1.9)
    # a length cap keeps strings short: the same source capped at 1 symbol per word
    assert tr.tunstall_expected_length(np.array([0.9, 0.1]), 1 << 10, max_len=1) == pytest.approx(1.0)
    # more words never lower the rate below the entropy
    p = tr.grid_probabilities(3.0)
    h = float(-(p * np.log2(p)).sum())
    assert h == pytest.approx(3.0, abs=1e-3)
    for bits in (8, 12):
        assert bits / tr.tunstall_expected_length(p, 1 << bits) > h
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-9)


def test_gemv_timeline_anchors_exist_in_the_kernel(bench_module):
    pytest.importorskip("triton")
    timeline = bench_module("gemv_timeline")
    src = timeline.instrumented_source()
    assert src.count("_clock(") == 4 and "trace_ptr" in src
