"""What every Triton kernel module here shares: the optional Triton import, two helpers and the
strict interpreted launch."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import types

import torch

try:  # Triton is optional: without it every layer takes its torch path
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "DeviceTensors", "StrictLaunch", "cdiv", "grid_dequantise", "interpret_mode", "interpreted",
           "jit_helpers", "jit_or_interpret", "linear_input", "scratch_weight", "tl", "triton", "use_triton"]


class DeviceTensors:
    """Mixin for the frozen dataclasses that hold a packed weight: its tensor fields, the bytes they hold on the
    device and a copy on another device. ``HOST_ONLY`` names tensor fields that are metadata for reference decoders
    (not counted in ``nbytes``)."""

    HOST_ONLY: tuple[str, ...] = ()

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}  # fmt: skip

    @property
    def nbytes(self) -> int:
        """Bytes held on the device by the tensors the kernels read."""
        return sum(t.numel() * t.element_size() for k, t in self._tensors().items() if k not in self.HOST_ONLY)

    def to(self, device):
        """The same weight with every tensor on ``device``."""
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self._tensors().items()})


def grid_dequantise(index: torch.Tensor, step: float, scales: torch.Tensor, rows: torch.Tensor | None = None):
    """The grid format's weights, ``float32(index * step) * scale`` (float32). ``scales`` holds one value or one per
    row; ``index`` is ``[N, K]``, or 1-D scattered weights whose rows are ``rows``."""
    scales = scales.to(index.device).float()
    if scales.numel() == 1:
        scale = scales.reshape(())
    else:
        scale = scales[rows.to(index.device)] if rows is not None else scales.reshape(-1, 1)
    return (index.double() * step).float() * scale


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


def interpret_mode() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET``), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


class StrictLaunch:
    """An interpreted kernel that refuses keyword arguments the kernel does not declare.

    The interpreter ignores them silently while the compiler raises, so without this a
    stale constexpr passes every CPU test and fails only on the GPU.
    """

    _LAUNCH_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg", "launch_pdl"})

    def __init__(self, kernel, fn):
        self.kernel = kernel
        self.params = frozenset(inspect.signature(fn).parameters)

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def checked(*args, **kwargs):
            unknown = set(kwargs) - self.params - self._LAUNCH_OPTIONS
            if unknown:
                raise TypeError(f"kernel got undeclared arguments {sorted(unknown)}")
            return launch(*args, **kwargs)

        return checked


def jit_helpers(module_globals: dict, names: tuple[str, ...]) -> dict:
    """Turn a kernel module's plain helper functions ``names`` into JITFunctions in place (what compiled kernels
    call) and return the plain ones (what :func:`interpreted` kernels call)."""
    plain = {name: module_globals[name] for name in names}
    if HAS_TRITON:
        from triton.runtime.jit import JITFunction

        for name, fn in plain.items():
            module_globals[name] = JITFunction(fn)
    return plain


def _rebind(fn, glb: dict):
    copy = types.FunctionType(fn.__code__, glb, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__module__ = fn.__module__
    return copy


def interpreted(fn, plain: dict) -> StrictLaunch:
    """``fn`` for Triton's interpreter: a copy that (like its helpers) sees the ``plain`` helpers of
    :func:`jit_helpers`, strict about keyword arguments."""
    from triton.runtime.interpreter import InterpretedFunction

    glb = dict(fn.__globals__)
    glb.update({name: _rebind(f, glb) for name, f in plain.items()})
    return StrictLaunch(InterpretedFunction(_rebind(fn, glb)), fn)


def linear_input(x: torch.Tensor, in_features: int, paths: tuple[str, ...], path: str | None):
    """Validate a quantised linear layer's input and ``path`` argument; return ``x`` as a 2-D matrix with
    contiguous rows and the leading shape of the result."""
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {in_features}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if path is not None and path not in paths:
        raise ValueError(f"path must be {', '.join(repr(q) for q in paths)} or None, got {path!r}")
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, x.shape[:-1]


def use_triton(t: torch.Tensor) -> bool:
    """Whether a kernel runs for ``t``: compiled on a GPU, or in the interpreter when it is active."""
    return HAS_TRITON and (t.is_cuda or interpret_mode())


@functools.cache
def jit_or_interpret(fn, interpret: bool):
    """``fn`` as a launchable kernel: interpreted (strict about keyword arguments) or jitted. Kernels
    are plain functions jitted here so that this choice follows TRITON_INTERPRET at call time."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return StrictLaunch(InterpretedFunction(fn), fn)
    return triton.jit(fn)


_SCRATCH: dict = {}


def scratch_weight(device: torch.device, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A dense ``[rows, cols]`` buffer reused by every layer of this shape on this device (weights
    decoded just in time for a matmul)."""
    key = (device, rows, cols, dtype)
    buf = _SCRATCH.get(key)
    if buf is None:
        buf = torch.empty((rows, cols), dtype=dtype, device=device)
        _SCRATCH[key] = buf
    return buf
