"""The format library: typed, serialisable weight formats that quantise, encode, decode and
count their bits exactly.  ``SPEC_REGISTRY`` maps each spec's ``kind`` to its class."""

from .block import GRANULARITIES, SCALE_FORMATS, STATISTICS, Scaling
from .grid import GridElement
from .optimal import DISTRIBUTIONS, CubeRootElement
from .packing import pack_codes, packed_nbytes, packing_layout, unpack_codes
from .rotation import Rotation, hadamard_transform
from .scalar import (
    NAMED_TABLES,
    ElementFormat,
    FPElement,
    IntElement,
    LloydMaxElement,
    LookupElement,
    LutElement,
    nearest_index,
)
from .sparse import SparseOutliers
from .spec import SPEC_REGISTRY, Spec, spec_from_dict
from .tensor import EncodedTensor, QuantisedParts, TensorFormat

__all__ = [
    "CubeRootElement",
    "DISTRIBUTIONS",
    "ElementFormat",
    "EncodedTensor",
    "FPElement",
    "GRANULARITIES",
    "GridElement",
    "IntElement",
    "LloydMaxElement",
    "LookupElement",
    "LutElement",
    "NAMED_TABLES",
    "QuantisedParts",
    "Rotation",
    "SCALE_FORMATS",
    "SPEC_REGISTRY",
    "STATISTICS",
    "Scaling",
    "SparseOutliers",
    "Spec",
    "TensorFormat",
    "hadamard_transform",
    "nearest_index",
    "pack_codes",
    "packed_nbytes",
    "packing_layout",
    "spec_from_dict",
    "unpack_codes",
]
