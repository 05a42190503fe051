"""Output precision conversions, exactly as SIE defines them.

* ``float32`` / ``float16``: a cast.
* ``int8``: per row, symmetric: ``round(x * 127 / max|x|)``, clipped to [-127, 127].
* ``uint8``: per row, min/max: ``round((x - min) / (max - min) * 255)``.
* ``binary``: ``numpy.packbits(x > 0)`` along the row; the message reports the unpacked dims.

A "row" is the whole dense vector, or one token's vector of a multivector. Sparse values are
only ever float32 or float16: for the integer and binary dtypes they stay float32.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

OUTPUT_DTYPES = ("float32", "float16", "int8", "uint8", "binary")
SPARSE_DTYPES = ("float32", "float16")

F32 = npt.NDArray[np.float32]


def convert(x: F32, dtype: str) -> npt.NDArray[np.generic]:
    """Convert a float32 vector ([dims]) or matrix ([rows, dims]) row by row."""
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16)
    if dtype == "int8":
        peak = np.abs(x).max(axis=-1, keepdims=True)
        scale = np.divide(127.0, peak, out=np.zeros_like(peak), where=peak > 0)
        out: npt.NDArray[np.generic] = np.clip(np.rint(x * scale), -127, 127).astype(np.int8)
        return out
    if dtype == "uint8":
        lo = x.min(axis=-1, keepdims=True)
        span = x.max(axis=-1, keepdims=True) - lo
        unit = np.divide(x - lo, span, out=np.zeros_like(x), where=span > 0)
        out = np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)
        return out
    if dtype == "binary":
        return np.packbits(x > 0, axis=-1)
    raise ValueError(f"unknown output dtype {dtype!r}")


def sparse_dtype(dtype: str) -> str:
    """The dtype sparse values travel in when ``dtype`` is requested."""
    return dtype if dtype in SPARSE_DTYPES else "float32"
