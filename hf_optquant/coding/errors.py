"""The single exception type of the coding module."""

from __future__ import annotations


class CorruptStreamError(ValueError):
    """A stored stream failed validation or did not decode cleanly.

    Raised for every detected problem: missing or extra tensors, wrong dtypes or shapes,
    inconsistent header fields, an invalid code table, a checksum mismatch, or a chunk whose
    rANS state does not return to its initial value. It subclasses ``ValueError`` so callers
    that only care about "bad input" can catch that instead.
    """
