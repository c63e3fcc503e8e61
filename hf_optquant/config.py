"""``OptQuantConfig``: the user-facing quantisation config (a transformers QuantizationConfigMixin)."""

from __future__ import annotations

import inspect
import math
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .formats import GRANULARITIES, SCALE_FORMATS, STATISTICS, Rotation, Scaling, SparseOutliers
from .formats.fit import DEFAULT_SCALING, FAMILIES
from .formats.spec import check_choice, check_int, check_range

__all__ = ["OptQuantConfig", "QUANT_METHOD", "ALLOCATIONS"]

QUANT_METHOD = "optquant"
ALLOCATIONS = ("uniform", "fisher", "fisher-global")


class OptQuantConfig(QuantizationConfigMixin):
    """How to quantise a model's linear weights.

    Args:
        bits: budget in bits per parameter over the quantised tensors, **all-inclusive**
            (codes, scales, tables, outliers, stream offsets).
        format: element family: ``grid`` (uniform grid + entropy code, the paper's optimum),
            ``cube_root``, ``lloyd_max``, ``int``, ``fp``, ``nf4``, ``sf4``.
        granularity, block_size, statistic, scale_format: the scaling (``None`` picks the
            family's default: block-64 absmax for fixed-length tables, channel rms for
            ``grid`` and ``lloyd_max``).
        distribution: for ``cube_root``: ``auto`` (searched), ``normal``, ``laplace``, ``student_t``.
        sparse_fraction: fraction of largest-magnitude weights kept in bf16 (0 disables).
        rotation_block: Hadamard rotation block size along the input dimension (0 disables).
        allocation: ``uniform`` (every tensor at ``bits``), ``fisher`` (the paper's rule
            b_i = b0 + log2 rms_i + 1/2 log2 mean Fisher_i), ``fisher-global`` (measured
            rate-distortion curves weighted by Fisher, optimised jointly).
        min_bits, max_bits: clamp on per-tensor allocations.
        fisher_mode: ``sampled`` (targets drawn from the model) or ``empirical``.
        weighted_fit: fit scales/tables to minimise the per-element Fisher-weighted error.
        calibration_text: text for Fisher estimation (``None``: the embedded default).
        calibration_tokens, calibration_seq_len: how much of it, in sequences of what length.
        modules_to_not_convert: module-name substrings left in full precision.
        seed: seeds sampling and subsampling, so results are reproducible.
    """

    def __init__(
        self,
        bits: float = 4.0,
        format: str = "grid",
        granularity: str | None = None,
        block_size: int = 64,
        statistic: str | None = None,
        scale_format: str = "bf16",
        distribution: str = "auto",
        sparse_fraction: float = 0.0,
        rotation_block: int = 0,
        allocation: str = "fisher",
        min_bits: float = 1.5,
        max_bits: float = 8.0,
        fisher_mode: str = "sampled",
        weighted_fit: bool = False,
        calibration_text: str | None = None,
        calibration_tokens: int = 8192,
        calibration_seq_len: int = 256,
        modules_to_not_convert: list[str] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.format = format
        self.granularity = granularity
        self.block_size = block_size
        self.statistic = statistic
        self.scale_format = scale_format
        self.distribution = distribution
        self.sparse_fraction = sparse_fraction
        self.rotation_block = rotation_block
        self.allocation = allocation
        self.min_bits = min_bits
        self.max_bits = max_bits
        self.fisher_mode = fisher_mode
        self.weighted_fit = weighted_fit
        self.calibration_text = calibration_text
        self.calibration_tokens = calibration_tokens
        self.calibration_seq_len = calibration_seq_len
        skip = ["lm_head"] if modules_to_not_convert is None else modules_to_not_convert
        self.modules_to_not_convert = list(skip) if isinstance(skip, tuple) else skip
        self.seed = seed
        kwargs.pop("quant_method", None)
        unknown = sorted(set(kwargs) - {"format_version"})
        if unknown:
            raise ValueError(f"OptQuantConfig got unknown fields {unknown}")
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; errors name the field and the allowed values."""
        owner = "OptQuantConfig"
        check_range(owner, "bits", self.bits, 1.0, 16.0)
        check_choice(owner, "format", self.format, sorted(FAMILIES))
        if self.granularity is not None:
            check_choice(owner, "granularity", self.granularity, GRANULARITIES)
        check_int(owner, "block_size", self.block_size, 8, 1 << 16)
        if self.statistic is not None:
            check_choice(owner, "statistic", self.statistic, STATISTICS)
        check_choice(owner, "scale_format", self.scale_format, SCALE_FORMATS)
        check_choice(owner, "distribution", self.distribution, ("auto", "normal", "laplace", "student_t"))
        check_choice(owner, "allocation", self.allocation, ALLOCATIONS)
        check_range(owner, "min_bits", self.min_bits, 0.5, 16.0)
        check_range(owner, "max_bits", self.max_bits, 0.5, 16.0)
        if self.min_bits > self.max_bits:
            raise ValueError(f"{owner}.min_bits ({self.min_bits}) must not exceed max_bits ({self.max_bits})")
        if not self.min_bits <= self.bits <= self.max_bits:
            raise ValueError(f"{owner}.bits must lie in [min_bits, max_bits] = "
                             f"[{self.min_bits}, {self.max_bits}], got {self.bits}")
        check_choice(owner, "fisher_mode", self.fisher_mode, ("sampled", "empirical"))
        check_choice(owner, "weighted_fit", self.weighted_fit, (True, False))
        text = self.calibration_text
        if text is not None and not (isinstance(text, str) and text.strip()):
            raise ValueError(f"{owner}.calibration_text must be a non-empty string or None (embedded default)")
        check_int(owner, "calibration_tokens", self.calibration_tokens, 16, 1 << 26)
        check_int(owner, "calibration_seq_len", self.calibration_seq_len, 8, 1 << 17)
        check_int(owner, "seed", self.seed, 0, 2**63 - 1)
        if not (isinstance(self.modules_to_not_convert, list)
                and all(isinstance(m, str) for m in self.modules_to_not_convert)):
            raise ValueError(f"{owner}.modules_to_not_convert must be a list of strings")
        check_int(owner, "rotation_block", self.rotation_block, 0, 1 << 15)
        if self.rotation_block and (self.rotation_block < 2 or math.log2(self.rotation_block) % 1):
            raise ValueError(f"{owner}.rotation_block must be 0 (off) or a power of two in [2, 32768], "
                             f"got {self.rotation_block}")
        # building the pieces validates the remaining combinations (e.g. signmax with e8m0)
        self.scaling(), self.sparse(), self.rotation()

    @classmethod
    def from_dict(cls, config_dict: Any, return_unused_kwargs: bool = False, **kwargs: Any):
        """Build from a JSON-style dict (``config.json``'s ``quantization_config``).

        Replaces the mixin's bare ``cls(**config_dict)``, under which malformed input raised
        TypeError (a list, a non-string key, a key named ``self``), and whose ``kwargs`` naming a
        field were set *after* validation; here they are validated like the dict's own fields.
        """
        if not isinstance(config_dict, dict):
            raise ValueError(f"OptQuantConfig must be built from a dict, got {type(config_dict).__name__}")
        odd = sorted(repr(k) for k in config_dict if not isinstance(k, str) or k == "self")
        if odd:
            raise ValueError(f"OptQuantConfig got unknown fields [{', '.join(odd)}]")
        fields = inspect.signature(cls.__init__).parameters
        overrides = {k: v for k, v in kwargs.items() if k in fields and k not in ("self", "kwargs")}
        config = cls(**{**config_dict, **overrides})
        unused = {k: v for k, v in kwargs.items() if k not in overrides}
        return (config, unused) if return_unused_kwargs else config

    @property
    def needs_fisher(self) -> bool:
        return self.allocation != "uniform" or self.weighted_fit

    def scaling(self) -> Scaling:
        default = DEFAULT_SCALING[self.format]
        return Scaling(
            granularity=self.granularity or default.granularity,
            block_size=self.block_size if (self.granularity or default.granularity) == "block" else 1,
            statistic=self.statistic or default.statistic,
            scale_format=self.scale_format,
        )

    def sparse(self) -> SparseOutliers | None:
        check_range("OptQuantConfig", "sparse_fraction", self.sparse_fraction, 0.0, 0.5)
        return SparseOutliers(self.sparse_fraction) if self.sparse_fraction > 0 else None

    def rotation(self) -> Rotation | None:
        return Rotation(self.rotation_block, seed=self.seed) if self.rotation_block else None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
