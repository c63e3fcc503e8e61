"""A canonical prefix-code decoder that reads one bit at a time (``test_prefix.py``, ``test_pairs.py``): the
independent reference the table-driven decoders are checked against."""

from __future__ import annotations


def decode_bits(bits: str, lengths, codes, count: int | None = None) -> list[int]:
    """Symbols of the bit string ``bits`` ('0'/'1') under the code giving symbol ``s`` the ``lengths[s]``-bit
    codeword ``codes[s]`` (length 0: unused); stops after ``count`` symbols (None: at the end of the bits)."""
    words = {(int(n), int(c)): s for s, (n, c) in enumerate(zip(lengths, codes, strict=True)) if int(n)}
    out, acc, length = [], 0, 0
    for b in bits:
        acc, length = (acc << 1) | int(b), length + 1
        if (length, acc) in words:
            out.append(words[(length, acc)])
            acc, length = 0, 0
            if len(out) == count:
                break
    return out
