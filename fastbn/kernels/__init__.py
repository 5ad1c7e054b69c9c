"""Numba kernels. The building blocks are public; the fused families are internal.

- blocks: mean, var, normalize, affine on (n, m) features-first arrays.
- rows: fused train forward, eval forward and backward for (P, C, Q) views
  whose runs Q are long.
- columns: the same for rows of interleaved features (batch-first,
  channels-last and short runs).
"""

from fastbn.kernels.blocks import affine, mean, normalize, var

__all__ = ["affine", "mean", "normalize", "var"]
