"""Property-based fuzzing of the coding module with hypothesis.

Three properties, each run ``HF_OPTQUANT_FUZZ_EXAMPLES`` times (default 200, so CI stays
fast); ``benchmarks/fuzz.py`` sets per-property counts (``roundtrip``, ``stream``, ``forged``)
through ``HF_OPTQUANT_CKPT_FUZZ`` for the dedicated run (see ``fuzz_support``):

1. arbitrary small integer arrays and chunk sizes round-trip bit-exactly;
2. any mutation of a stored stream (bit flips, byte writes, truncation, extension, dtype or
   shape changes, missing/extra/swapped tensors, header fields) raises CorruptStreamError,
   unless it left every stored byte unchanged, in which case it decodes to the original;
3. the same byte mutations with the CRC recomputed (an adversary, or a bug that bypasses the
   checksum) still either raise CorruptStreamError or decode to the declared number of int64
   symbols: no other exception, no hang, no out-of-range access.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
from fuzz_support import OUTCOMES, counts, fuzz_settings, guard
from hypothesis import given
from hypothesis import strategies as st

from hf_optquant.coding import (
    CodedStream,
    CorruptStreamError,
    decode_symbols,
    encode_symbols,
    stream_from_tensors,
)
from hf_optquant.coding.layout import HEADER, HEADER_LEN, TENSOR_NAMES, Header
from hf_optquant.coding.stream import _crc

EXAMPLES = int(os.environ.get("HF_OPTQUANT_FUZZ_EXAMPLES", "200"))
COUNTS = counts({"roundtrip": EXAMPLES, "stream": EXAMPLES, "forged": EXAMPLES})
SEED = int(os.environ.get("HF_OPTQUANT_TEST_SEED", "0"))
NAMES = TENSOR_NAMES


@functools.cache
def base_streams() -> dict[str, tuple[CodedStream, torch.Tensor]]:
    """Small streams covering escapes, several groups, 2-D rows, one symbol, and empty input."""
    rng = np.random.default_rng(SEED + 12345)
    t5 = np.round(rng.standard_t(5, 1500) * 6).astype(np.int64)
    t5[rng.choice(t5.size, 4, replace=False)] = [10**9, -(2**40), 2**63 - 1, 300]
    low = np.round(rng.standard_t(5, (40, 64)) * 0.6).astype(np.int64)  # low entropy: tail_ext entries
    inputs = {
        "escapes": (t5, 16),
        "rows": (low, 64),  # encoded with row_length=64 below
        "tiny": (rng.integers(-2, 3, 9).astype(np.int64), 4),
        "single": (np.full(700, -5, np.int64), 256),
        "empty": (np.zeros(0, np.int64), 64),
    }
    out = {}
    for name, (q, chunk) in inputs.items():
        sym = torch.from_numpy(q)
        rows = sym.shape[-1] if sym.dim() == 2 else None
        out[name] = (encode_symbols(sym, chunk_size=chunk, row_length=rows), sym.reshape(-1))
    assert out["rows"][0].header.num_tail_ext > 0 and out["rows"][0].header.payload_words > 0
    return out


# --- property 1: round trips --------------------------------------------------------------

values = st.one_of(
    st.integers(-3, 3),
    st.integers(-300, 300),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**63), 2**63 - 1),
)


@fuzz_settings(COUNTS["roundtrip"])
@given(data=st.lists(values, max_size=400), chunk_size=st.integers(1, 70), cols=st.integers(0, 40))
def test_arbitrary_arrays_round_trip(data: list[int], chunk_size: int, cols: int) -> None:
    sym = torch.tensor(data, dtype=torch.int64)
    rows = cols or None  # cols > 0: the GPU row layout (a short last row included)
    with guard("roundtrip"):
        out = decode_symbols(encode_symbols(sym, chunk_size=chunk_size, row_length=rows))
    assert torch.equal(out, sym)
    OUTCOMES[("roundtrip", "round-trips bit-exactly")] += 1


# --- mutations ----------------------------------------------------------------------------


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint8).copy()


def _tensor(raw: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    itemsize = like.element_size()
    raw = raw[: raw.size - raw.size % itemsize]
    return torch.from_numpy(raw.view(like.numpy().dtype).copy())


@st.composite
def byte_mutation(draw, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mutate the bytes of one or more tensors (dtypes and ranks unchanged)."""
    out = dict(tensors)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(NAMES))
        raw = _bytes(out[name])
        op = draw(st.sampled_from(["flip", "write", "truncate", "extend", "field"]))
        if op in ("flip", "write") and raw.size:
            pos = draw(st.integers(0, raw.size - 1))
            if op == "flip":
                raw[pos] ^= np.uint8(1 << draw(st.integers(0, 7)))
            else:
                raw[pos] = draw(st.integers(0, 255))
        elif op == "truncate" and raw.size:
            raw = raw[: draw(st.integers(0, raw.size - 1))]
        elif op == "extend":
            raw = np.concatenate([raw, np.array(draw(st.lists(st.integers(0, 255), min_size=1,
                                                              max_size=16)), np.uint8)])
        elif op == "field":
            header = out[HEADER].numpy().copy()
            if header.size:
                idx = draw(st.integers(0, header.size - 1))
                header[idx] = draw(st.one_of(st.integers(-3, 70000),
                                             st.integers(-(2**63), 2**63 - 1)))
            out[HEADER] = torch.from_numpy(header)
            continue
        out[name] = _tensor(raw, out[name])
    return out


@st.composite
def structural_mutation(draw, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    op = draw(st.sampled_from(["drop", "add", "swap", "retype", "reshape"]))
    name = draw(st.sampled_from(NAMES))
    if op == "drop":
        del out[name]
    elif op == "add":
        extra = draw(st.sampled_from(["extra", "crc", name.upper()]))
        out[extra] = torch.zeros(2, dtype=torch.int16)
    elif op == "swap":
        other = draw(st.sampled_from(NAMES))
        out[name], out[other] = out[other], out[name]
    elif op == "retype":
        dtype = draw(st.sampled_from([torch.int8, torch.uint8, torch.int16, torch.int32,
                                      torch.int64, torch.float32]))
        out[name] = out[name].to(dtype)
    else:
        out[name] = out[name].reshape(1, -1)
    return out


def _same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])
        for k in a
    )


def _fix_crc(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Recompute the stored CRC (only possible when the header still has all its fields)."""
    header = tensors[HEADER].numpy()
    if header.size != HEADER_LEN:
        return tensors
    h = Header.from_array(header)
    fixed = header.copy()
    fixed[-1] = _crc(h, tensors)
    return {**tensors, HEADER: torch.from_numpy(fixed)}


# --- property 2: every stored-byte change is detected -------------------------------------


@fuzz_settings(COUNTS["stream"])
@given(data=st.data(), base=st.sampled_from(["escapes", "rows", "tiny", "single", "empty"]),
       structural=st.booleans())
def test_mutated_streams_are_detected(data, base: str, structural: bool) -> None:
    stream, original = base_streams()[base]
    strategy = structural_mutation if structural else byte_mutation
    mutated = data.draw(strategy(stream.tensors))
    try:
        with guard("stream"):
            out = decode_symbols(stream_from_tensors(mutated))
    except CorruptStreamError as err:
        assert str(err) and not _same_bytes(mutated, stream.tensors), "unchanged stream was rejected"
        OUTCOMES[("stream", "rejected (CorruptStreamError)")] += 1
        return
    assert _same_bytes(mutated, stream.tensors), "a changed stream was accepted"
    assert torch.equal(out, original)
    OUTCOMES[("stream", "unchanged bytes, decodes to the original")] += 1


# --- property 3: bounded and well-behaved even when the CRC is forged ---------------------


@fuzz_settings(COUNTS["forged"])
@given(data=st.data(), base=st.sampled_from(["escapes", "rows", "tiny", "single", "empty"]))
def test_forged_crc_streams_fail_cleanly(data, base: str) -> None:
    stream, _ = base_streams()[base]
    mutated = _fix_crc(data.draw(byte_mutation(stream.tensors)))
    try:
        with guard("forged"):
            checked = stream_from_tensors(mutated)
            out = decode_symbols(checked)
    except CorruptStreamError as err:
        assert str(err), "empty error message"
        OUTCOMES[("forged", "rejected (CorruptStreamError)")] += 1
        return
    assert out.dtype == torch.int64 and out.shape == (checked.num_symbols,)
    same = _same_bytes(mutated, stream.tensors)
    if same:
        assert torch.equal(out, base_streams()[base][1]), "unchanged stream decoded differently"
    OUTCOMES[("forged", "unchanged, decodes to the original" if same else
              "decoded garbage of the declared length (CRC forged)")] += 1
