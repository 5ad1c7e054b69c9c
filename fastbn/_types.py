"""Type aliases shared by the package's modules (annotations only)."""

from __future__ import annotations

from typing import TypeAlias, TypeVar

import numpy as np
from numpy.typing import NDArray

__all__ = ["Array", "Float", "Float64", "Forward", "Gradients"]

# The dtype of an ndarray x, in which its results come back (float32 or float64).
Float = TypeVar("Float", bound=np.floating)
Array: TypeAlias = NDArray[np.floating]
Float64: TypeAlias = NDArray[np.float64]
# (y, mean, invstd) of a training forward and (dx, dgamma, dbeta) of a backward, in float32
# or float64; for an ndarray x, the first overload of each function says which.
Forward: TypeAlias = tuple[Array, Float64, Float64]
Gradients: TypeAlias = tuple[Array, Array, Array]
