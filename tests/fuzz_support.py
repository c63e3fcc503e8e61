"""Shared bookkeeping of the fuzz properties (``test_fuzz_checkpoint.py``, ``test_coding_fuzz.py``).

Example counts per property come from ``HF_OPTQUANT_CKPT_FUZZ`` (a JSON object, set by
``benchmarks/fuzz.py`` for the dedicated run) over each module's bounded CI defaults.  Every
example runs under ``guard``: a SIGALRM time limit (a hang fails the property) and the
slowest-example record; ``OUTCOMES`` counts what happened to each input, so the benchmark can
report rejections and verified acceptances separately.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import time

from hypothesis import HealthCheck, settings

TIME_LIMIT_S = 60
OUTCOMES: collections.Counter = collections.Counter()
DURATIONS: dict[str, float] = collections.defaultdict(float)


def counts(defaults: dict[str, int]) -> dict[str, int]:
    """``defaults`` overridden by the dedicated run's counts for the same property names."""
    override = json.loads(os.environ.get("HF_OPTQUANT_CKPT_FUZZ", "{}"))
    return {**defaults, **{k: v for k, v in override.items() if k in defaults}}


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@contextlib.contextmanager
def guard(prop: str):
    """Per-example time limit (SIGALRM; a hang fails the test) and slowest-example bookkeeping."""
    def timeout(signum, frame):
        raise TimeoutError(f"{prop} example exceeded {TIME_LIMIT_S} s (hang?)")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(TIME_LIMIT_S)
    start = time.perf_counter()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        DURATIONS[prop] = max(DURATIONS[prop], time.perf_counter() - start)
