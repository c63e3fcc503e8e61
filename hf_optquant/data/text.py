"""Bundled public-domain English prose for calibration and evaluation (see TEXT_SOURCES.md).

* ``calibration``: Herman Melville, *Moby-Dick* (1851), chapters 1-25 (~231 KB).
* ``evaluation``: Arthur Conan Doyle, *The Adventures of Sherlock Holmes* (1892),
  adventures I-V (~225 KB). Different author and book, so the two splits are disjoint.
"""

from __future__ import annotations

from importlib import resources
from typing import Literal

__all__ = ["Split", "load_text"]

Split = Literal["calibration", "evaluation"]


def load_text(split: Split) -> str:
    """Return the bundled UTF-8 text for ``split`` (paragraphs separated by blank lines)."""
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', not {split!r}")
    return (
        resources.files("hf_optquant")
        .joinpath("data")
        .joinpath(f"{split}.txt")
        .read_text(encoding="utf-8")
    )
