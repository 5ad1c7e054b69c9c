"""The torch the bridge is tested on, and the internals it uses, each beside its public fallback.

`TESTED_TORCH` is the release the test suite runs on (the ``torch`` extra of
pyproject.toml pins it); importing `fastbn.torch` under another release
warns once (`warn_if_untested`), naming it.

Each name below is read once, at import: where a torch release lacks the
internal, the public mechanism takes its place (slower per call, same
results). `fastbn.torch`'s tests force every fallback.

- `function_apply`: an autograd Function's ``apply`` straight from its C
  base, less the Python wrapper's per-call work for functorch transforms
  (which the bridge routes elsewhere, see `transforms_active`); fallback:
  the Function's own ``apply``.
- `transforms_active`: whether a torch.func transform (grad, vmap, jvp, ...)
  is running; torch's own ``Function.apply`` asks the same question.
  Fallback: whether any tensor of the call lacks storage, as functorch's
  wrapper tensors do.
- `dual_tensors`: whether forward-mode AD (``torch.autograd.forward_ad``)
  gives any of the call's tensors a tangent; the internal level counter
  spares the per-tensor question when no dual level is open. Fallback:
  ``unpack_dual`` of every tensor.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad

__all__ = [
    "TESTED_TORCH",
    "dual_tensors",
    "function_apply",
    "transforms_active",
    "warn_if_untested",
]

TESTED_TORCH = "2.13.0"  # the torch extra's pin; the test suite's torch


def warn_if_untested(version: str) -> None:
    """A RuntimeWarning when version (torch.__version__) is not the tested release."""
    release = version.split("+")[0]  # "2.13.0+cpu" is 2.13.0
    if release != TESTED_TORCH:
        warnings.warn(
            f"fastbn.torch is tested with torch {TESTED_TORCH} only, and this is torch "
            f"{version}: the bridge uses torch internals with public fallbacks, so it should "
            f"work, but it has not been tested here; pip install 'fastbn[torch]' installs "
            f"torch {TESTED_TORCH}",
            RuntimeWarning,
            stacklevel=2,
        )


_FUNCTION_BASE_APPLY: Any = getattr(getattr(torch._C, "_FunctionBase", None), "__dict__", {}).get(
    "apply"
)
_ARE_TRANSFORMS_ACTIVE: Callable[[], bool] | None = getattr(
    torch._C, "_are_functorch_transforms_active", None
)
_HAS_LEVEL = hasattr(forward_ad, "_current_level")


def function_apply(function: type[torch.autograd.Function]) -> Callable[..., Any]:
    """The cheapest correct ``apply`` of an autograd Function, outside torch.func transforms."""
    if _FUNCTION_BASE_APPLY is None:
        return function.apply
    apply: Callable[..., Any] = _FUNCTION_BASE_APPLY.__get__(None, function)
    return apply


def _lacks_storage(t: torch.Tensor | None) -> bool:
    if t is None:
        return False
    try:
        t.data_ptr()
    except RuntimeError:  # functorch's wrappers (BatchedTensor, TensorWrapper) have none
        return True
    return False


def transforms_active(*tensors: torch.Tensor | None) -> bool:
    """Whether a torch.func transform runs around this call (tensors: the call's own)."""
    if _ARE_TRANSFORMS_ACTIVE is not None:
        return _ARE_TRANSFORMS_ACTIVE()
    return any(_lacks_storage(t) for t in tensors)


def dual_tensors(*tensors: torch.Tensor | None) -> bool:
    """Whether any of tensors carries a forward-mode AD tangent."""
    if _HAS_LEVEL and forward_ad._current_level < 0:  # no dual level is open
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
