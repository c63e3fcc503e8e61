"""Typed, JSON-serialisable specs and the registry that maps names to spec classes.

Every piece of a format (element table, scaling, sparse outliers, rotation, the
composite tensor format) is a frozen dataclass deriving from :class:`Spec`.  A spec
is pure description: it can be written to JSON (``to_dict``) and read back
(``spec_from_dict``), and it validates itself on construction so that a bad value
fails early with a :class:`ValueError` naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any, ClassVar, TypeVar

__all__ = [
    "Spec",
    "SPEC_REGISTRY",
    "register_spec",
    "spec_from_dict",
    "check_choice",
    "check_range",
    "check_int",
]

SPEC_REGISTRY: dict[str, type[Spec]] = {}
S = TypeVar("S", bound="type[Spec]")


def register_spec(kind: str):
    """Class decorator: registers a :class:`Spec` subclass under ``kind``."""

    def wrap(cls: S) -> S:
        if kind in SPEC_REGISTRY:
            raise RuntimeError(f"spec kind {kind!r} registered twice")
        cls.kind = kind
        SPEC_REGISTRY[kind] = cls
        return cls

    return wrap


def check_choice(owner: str, field: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    # match type as well as value: 1 == True and 0.0 == False would otherwise pass for a boolean choice
    if not any(isinstance(value, type(option)) and value == option for option in allowed):
        raise ValueError(f"{owner}.{field} must be one of {list(allowed)}, got {value!r}")


def check_range(
    owner: str, field: str, value: Any, low: float | None = None, high: float | None = None
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    # ints compare exactly; math.isfinite(int) would raise OverflowError above ~1e308 (e.g. a fuzzed JSON number)
    ok = ok and (isinstance(value, int) or math.isfinite(value))
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{owner}.{field} must be a finite number in [{lo}, {hi}], got {value!r}")


def check_int(owner: str, field: str, value: Any, low: int | None = None, high: int | None = None):
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{owner}.{field} must be an integer, got {value!r}")
    check_range(owner, field, value, low, high)


@dataclasses.dataclass(frozen=True)
class Spec:
    """Base of all format specs: validation hook and JSON round trip."""

    kind: ClassVar[str] = "spec"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden by subclasses
        """Raise ValueError naming the bad field and the allowed values."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            out[f.name] = _to_json(getattr(self, f.name))
        return out

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


def _to_json(value: Any) -> Any:
    if isinstance(value, Spec):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def spec_from_dict(data: dict[str, Any]) -> Spec:
    """Rebuild a spec written by :meth:`Spec.to_dict`; unknown kinds or fields raise ValueError."""
    if not isinstance(data, dict) or "kind" not in data:
        raise ValueError(f"a format spec must be a dict with a 'kind' key, got {data!r}")
    kind = data["kind"]
    check_choice("spec", "kind", kind, sorted(SPEC_REGISTRY))
    cls = SPEC_REGISTRY[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields) - {"kind"}
    if unknown:
        raise ValueError(f"{cls.__name__} got unknown fields {sorted(unknown)}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        if name == "kind":
            continue
        if isinstance(value, dict) and "kind" in value:
            value = spec_from_dict(value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
