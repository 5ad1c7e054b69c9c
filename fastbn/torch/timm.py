"""timm's BatchNormAct2d on fastbn's kernels, for `convert` and `revert`.

timm (pytorch-image-models) builds the norm layers of its EfficientNet,
MobileNetV3, RegNet, DenseNet, MixNet, ReXNet, EfficientNetV2 and more as
``timm.layers.norm_act.BatchNormAct2d``: a subclass of torch's BatchNorm2d
whose forward is torch's module forward followed by ``self.drop`` and then
``self.act``. `convert` changes its class in place to a subclass of it made
here (``fastbn.torch.timm.BatchNormAct2d``): the same parameters, buffers,
state_dict keys, ``act`` and ``drop`` modules, hooks and training mode, the
batch norm on fastbn's kernels, then timm's drop and act in timm's order;
`revert` gives timm's class back.

fastbn never imports timm for this: a model can hold timm's layer only once
timm is imported, so `convert` looks for the class in ``sys.modules``
(importing timm would cost seconds and pull in torchvision) and matches it by
identity, as it matches torch's classes: a subclass of timm's class, or a
class of the same name elsewhere, is left alone. The one import of timm is
on asking this module for ``BatchNormAct2d`` by name, as unpickling a
converted model (``torch.save`` of the whole module) does: the class is made
from timm's then.

timm's other batch norms are left alone: ``SyncBatchNormAct`` (a subclass of
torch's SyncBatchNorm, with the statistics of all ranks), ``FrozenBatchNormAct2d``
(fixed statistics and affine terms, not a BatchNorm module) and
``SplitBatchNorm2d`` (a forward of its own, with auxiliary batch norms for
parts of the batch).
"""

import importlib
import sys
from typing import TYPE_CHECKING, Any

import torch

from fastbn.torch.modules import FastBatchNorm

__all__ = ["BatchNormAct", "fast_class", "fast_classes", "library_classes"]

# Where timm 1.0 defines its class.
TIMM_MODULE = "timm.layers.norm_act"
TIMM_CLASS = "BatchNormAct2d"

# timm's class -> fastbn's, one made per class of timm's seen.
_MADE: dict[type[torch.nn.Module], type[torch.nn.Module]] = {}


class BatchNormAct(FastBatchNorm):
    """timm's BatchNormAct2d forward on fastbn's batch norm: the norm, then drop, then act.

    Mixed in ahead of timm's class by `fast_class`.
    """

    if TYPE_CHECKING:  # timm's constructor sets them (as submodules, which TorchScript reads)
        act: torch.nn.Module
        drop: torch.nn.Module

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # timm's constructor (act_layer, drop_layer, ...), not FastBatchNorm's torch keywords.
        super(FastBatchNorm, self).__init__(*args, **kwargs)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        # timm's check: an AssertionError with its message, where BatchNorm2d raises ValueError.
        if input.dim() != 4:
            raise AssertionError(f"expected 4D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            y = self._scripted_forward(input)
        else:
            y = self._fast_forward(input)
            if isinstance(y, torch.fx.Proxy):
                return y  # fx recorded a call of the whole layer, its drop and act included
        return self.act(self.drop(y))


def fast_class(library_class: type[torch.nn.Module]) -> type[torch.nn.Module]:
    """fastbn's class for timm's BatchNormAct2d class: a subclass of it, made once."""
    made = _MADE.get(library_class)
    if made is None:
        name = library_class.__name__
        made = type(
            name,
            (BatchNormAct, library_class),
            {
                "__module__": __name__,
                "__qualname__": name,
                "__doc__": f"timm's {name} on fastbn's kernels (see `fastbn.torch.timm`).",
            },
        )
        _MADE[library_class] = made
    return made


def fast_classes() -> dict[type[torch.nn.Module], type[torch.nn.Module]]:
    """{timm's class: fastbn's} for `convert`, empty while timm is not imported."""
    library_class = getattr(sys.modules.get(TIMM_MODULE), TIMM_CLASS, None)
    if library_class is None:
        return {}
    return {library_class: fast_class(library_class)}


def library_classes() -> dict[type[torch.nn.Module], type[torch.nn.Module]]:
    """{fastbn's class: timm's} for `revert`, for every class `fast_class` made."""
    return {fast: theirs for theirs, fast in _MADE.items()}


def __getattr__(name: str) -> type[torch.nn.Module]:
    # ``fastbn.torch.timm.BatchNormAct2d``, as pickle finds a converted layer's class.
    if name == TIMM_CLASS:
        library_class = getattr(importlib.import_module(TIMM_MODULE), TIMM_CLASS)
        return fast_class(library_class)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
