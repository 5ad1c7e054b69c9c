"""BatchNorm1d, BatchNorm2d, BatchNorm3d on fastbn's kernels; `convert` and `revert`.

Each is a subclass of torch's module of the same name, with the same
constructor, parameters, buffers, state_dict, repr and input checks: only
`forward` differs, and only where fastbn's kernels take the call (CPU
float32/float64 tensors, not traced by torch.jit or ONNX export). Scripted
with torch.jit, a module runs torch's own forward.

One keyword more than torch's: ``virtual_batch_size=k`` (default None) makes
a training forward ghost batch norm (`fastbn.torch.ghost`): each consecutive
slice of k examples normalized with its own statistics and folded into the
running statistics in turn, num_batches_tracked counting the slices. Eval
mode is unchanged. A scripted module ignores it (torch's own forward).
"""

# No `from __future__ import annotations`: torch.jit.script reads the annotations
# of the modules' forward.
import itertools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.types import Device

from fastbn.ghost import checked_virtual_batch_size
from fastbn.torch import dispatch, functional, ghost

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
    "convert",
    "forward_state",
    "leaf_call",
    "revert",
]


_TensorOrNone: TypeAlias = torch.Tensor | None
# (weight, bias, running_mean, running_var, counter, momentum): see `forward_state`.
_ForwardState: TypeAlias = tuple[
    _TensorOrNone, _TensorOrNone, _TensorOrNone, _TensorOrNone, _TensorOrNone, float | None
]
_ModuleT = TypeVar("_ModuleT", bound=torch.nn.Module)
# Module classes to swap in: torch's BatchNorm classes and fastbn's.
_Table: TypeAlias = Mapping[type[torch.nn.Module], type[torch.nn.Module]]

if TYPE_CHECKING:
    # What the mixin is mixed into (ahead of it in the bases): its attributes are torch's.
    _MixinBase = _BatchNorm
else:
    _MixinBase = object


class FastBatchNorm(_MixinBase):
    """The forward shared by the three modules: torch's module logic on `functional.forward`."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Device = None,
        dtype: torch.dtype | None = None,
        *,
        virtual_batch_size: int | None = None,
        implementation: dispatch.Implementation = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        if virtual_batch_size is not None:
            virtual_batch_size = checked_virtual_batch_size(virtual_batch_size)
        self.virtual_batch_size = virtual_batch_size
        self.implementation = dispatch.checked(implementation)

    def extra_repr(self) -> str:
        k = self.__dict__.get("virtual_batch_size")
        implementation = self.__dict__.get("implementation", "auto")
        return (
            super().extra_repr()
            + ("" if k is None else f", virtual_batch_size={k}")
            + ("" if implementation == "auto" else f", implementation={implementation!r}")
        )

    fused_relu = False  # True in the BatchNormReLU modules: a ReLU follows, in the same kernels
    # TorchScript sees class attributes only as constants; this mixin comes first in the MRO.
    __constants__ = [*_BatchNorm.__constants__, "fused_relu"]  # noqa: RUF012 (torch's is a list)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            y = self._scripted_forward(input)
            return torch.relu(y) if self.fused_relu else y
        return self._fast_forward(input)

    def _scripted_forward(self, input: torch.Tensor) -> torch.Tensor:
        """torch's module forward, which torch.jit.script compiles in place of fastbn's."""
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            momentum = self.momentum
            factor = 1.0 / float(self.num_batches_tracked) if momentum is None else momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        return torch.nn.functional.batch_norm(
            input,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self.weight,
            self.bias,
            batch_stats,
            factor,
            self.eps,
        )

    @torch.jit.unused
    def _fast_forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):
            return leaf_call(self, input)
        self._check_input_dim(input)
        weight, bias, running_mean, running_var, counter, momentum = forward_state(self)
        batch_stats = self.training or (running_mean is None and running_var is None)
        if self.training and not self.track_running_stats:
            running_mean = running_var = None
        # A converted torch module (its class changed in place) has no such attribute.
        virtual_batch_size = self.__dict__.get("virtual_batch_size")
        if self.training and virtual_batch_size is not None:
            y = ghost.forward(
                input, running_mean, running_var, weight, bias, virtual_batch_size, momentum,
                self.eps, counter, stacklevel=7,
            )  # fmt: skip
            # The ghost kernels fuse no ReLU.
            return functional.relu_after(y) if self.fused_relu else y
        if batch_stats:
            functional.verify_batch_size(input.size())
        return functional.forward(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            batch_stats,
            momentum,
            self.eps,
            counter,
            stacklevel=7,  # the caller of the module, through torch's Module.__call__
            relu=self.fused_relu,
            # A converted torch module (its class changed in place) may have no attribute.
            implementation=self.__dict__.get("implementation", "auto"),
        )


def leaf_call(module: torch.nn.Module, input: torch.fx.Proxy) -> torch.fx.Proxy:
    """A ``call_module`` node for module, as torch.fx records torch's own BatchNorm (a leaf).

    fx traces into the forward of modules outside ``torch.nn``; recording the
    call instead keeps the module's behaviour dynamic (train and eval mode,
    the running statistics), as it is for torch's modules in a traced graph.
    """
    tracer = input.tracer
    assert isinstance(tracer, torch.fx.Tracer)  # symbolic_trace's, or a subclass
    if type(tracer).__module__.startswith("torch.ao.quantization"):
        raise RuntimeError(
            f"fastbn.torch: FX graph-mode quantization folds BatchNorm into the convolution "
            f"before it, which it does for torch's BatchNorm classes only, not "
            f"{type(module).__name__} at {tracer.path_of_module(module)!r}: call "
            f"fastbn.torch.revert(model) before prepare_fx (fastbn's layers are for training)"
        )
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (input,), {})


def forward_state(module: _BatchNorm) -> _ForwardState:
    """A BatchNorm module's tensors for a forward, by torch's module rule.

    Returns (weight, bias, running_mean, running_var, counter, momentum):
    counter is num_batches_tracked when this forward may fold the batch into
    the running statistics (training and tracking), else None, and momentum
    None (the cumulative average) only then. Buffers are read from the
    module's dict (Module.__getattr__ costs about 0.5 us a tensor), and so
    are weight and bias while they are plain parameters; where pruning or a
    parametrization took them out of it, as the attributes torch's forward
    reads (``module.weight``), so that the reparametrized tensors apply.
    """
    parameters, buffers = module._parameters, module._buffers
    weight = parameters["weight"] if "weight" in parameters else module.weight
    bias = parameters["bias"] if "bias" in parameters else module.bias
    counter: torch.Tensor | None = None
    momentum: float | None = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats:
        counter = buffers.get("num_batches_tracked")
        if counter is not None:
            momentum = module.momentum
    return (
        weight,
        bias,
        buffers.get("running_mean"),
        buffers.get("running_var"),
        counter,
        momentum,
    )


class BatchNorm1d(FastBatchNorm, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on fastbn's kernels: (N, C) and (N, C, L) input."""


class BatchNorm2d(FastBatchNorm, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on fastbn's kernels: (N, C, H, W), contiguous or channels_last."""


class BatchNorm3d(FastBatchNorm, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on fastbn's kernels: (N, C, D, H, W), any of its two layouts."""


class BatchNormReLU1d(BatchNorm1d):
    """BatchNorm1d followed by ReLU, fused: max(y, 0) in the same passes over memory.

    The backward recomputes the ReLU's mask from the input (nothing more is
    stored than for BatchNorm1d); gradients are those of BatchNorm1d then
    torch.nn.ReLU, with ReLU's subgradient 0 where y == 0.
    """

    fused_relu = True


class BatchNormReLU2d(BatchNorm2d):
    """BatchNorm2d followed by ReLU, fused (see BatchNormReLU1d)."""

    fused_relu = True


class BatchNormReLU3d(BatchNorm3d):
    """BatchNorm3d followed by ReLU, fused (see BatchNormReLU1d)."""

    fused_relu = True


_FAST: _Table = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}
_TORCH: _Table = {fast: theirs for theirs, fast in _FAST.items()}
# A BatchNorm directly followed by a ReLU in a Sequential, torch's or fastbn's, fuses into these.
_FUSED: _Table = {
    **{bn: BatchNormReLU1d for bn in (torch.nn.BatchNorm1d, BatchNorm1d)},
    **{bn: BatchNormReLU2d for bn in (torch.nn.BatchNorm2d, BatchNorm2d)},
    **{bn: BatchNormReLU3d for bn in (torch.nn.BatchNorm3d, BatchNorm3d)},
}
_UNFUSED: _Table = {
    BatchNormReLU1d: torch.nn.BatchNorm1d,
    BatchNormReLU2d: torch.nn.BatchNorm2d,
    BatchNormReLU3d: torch.nn.BatchNorm3d,
}


def _fast_table() -> _Table:
    """_FAST and the model libraries' layers: timm's BatchNormAct2d once timm is imported."""
    from fastbn.torch import timm  # here, not at the top: it subclasses FastBatchNorm

    return {**_FAST, **timm.fast_classes()}


def _torch_table() -> _Table:
    """_TORCH and the model libraries' layers that `_fast_table` converted."""
    from fastbn.torch import timm  # as in _fast_table

    return {**_TORCH, **timm.library_classes()}


def _replace(module: torch.nn.Module, table: _Table) -> None:
    swapped = table.get(type(module))
    if swapped is not None:
        module.__class__ = swapped
        return
    for child in module.children():
        _replace(child, table)


def _swap_pairs(
    module: torch.nn.Module,
    table: _Table,
    follower: type[torch.nn.Module],
    replacement: Callable[[Any, Any], torch.nn.Module],
) -> None:
    """In every Sequential, a module of a type in table directly followed by a `follower` type
    takes the table's class, and the follower is replaced by ``replacement(first, follower)``.
    """
    for child in module.children():
        _swap_pairs(child, table, follower, replacement)
    if isinstance(module, torch.nn.Sequential):
        layers = module._modules
        for first, second in itertools.pairwise(list(layers)):
            if type(layers[first]) in table and type(layers[second]) is follower:
                layers[first].__class__ = table[type(layers[first])]
                layers[second] = replacement(layers[first], layers[second])


def _identity_for(bn: torch.nn.Module, relu: torch.nn.ReLU) -> torch.nn.Identity:
    """nn.Identity in place of a fused ReLU; the BatchNorm remembers the ReLU's inplace flag."""
    bn.__dict__["_relu_inplace"] = relu.inplace  # a plain attribute, as `_relu_for` reads it
    return torch.nn.Identity()


def _relu_for(bn: torch.nn.Module, identity: torch.nn.Identity) -> torch.nn.ReLU:
    """The nn.ReLU that `_identity_for` replaced, with its inplace flag."""
    return torch.nn.ReLU(inplace=bn.__dict__.pop("_relu_inplace", False))


def convert(
    module: _ModuleT, fuse_relu: bool = False, implementation: dispatch.Implementation = "auto"
) -> _ModuleT:
    """Make every torch BatchNorm1d/2d/3d (and timm's BatchNormAct2d) fastbn's, in place.

    Layers are converted in place (their class changes), so parameters,
    buffers, requires_grad, the training mode, hooks and the optimizers that
    hold the parameters are all kept; a BatchNorm passed as the module itself
    comes back converted; module is returned. timm's BatchNormAct2d keeps
    its act, drop and isinstance (`fastbn.torch.timm`). Other subclasses of
    torch's classes (SyncBatchNorm, fastbn's own, timm's others, anyone
    else's) are left alone.

    Parameters
    ----------
    module : torch.nn.Module
    fuse_relu : bool, default False
        Also fuse each BatchNorm directly followed by ``nn.ReLU`` inside an
        ``nn.Sequential`` into a BatchNormReLU module; the ReLU is replaced by
        ``nn.Identity``, so the Sequential's indices and state_dict keys stay.
        A ReLU elsewhere (a functional call in a forward) is not seen.
    implementation : {"auto", "fastbn", "torch"}, default "auto"
        Which implementation takes each converted layer's eager calls:
        ``"auto"`` the one that wins at the call's size, layout, dtype and
        mode (`fastbn.torch.dispatch`), ``"fastbn"`` fastbn's kernels,
        ``"torch"`` torch's op; fastbn's running-statistics rule holds on
        both. Set on every fastbn BatchNorm in module, converted now or
        before.

    Returns
    -------
    torch.nn.Module
        module itself.
    """
    implementation = dispatch.checked(implementation)
    if fuse_relu:
        _swap_pairs(module, _FUSED, torch.nn.ReLU, _identity_for)
    _replace(module, _fast_table())
    for layer in module.modules():
        if isinstance(layer, FastBatchNorm):
            layer.implementation = implementation
    return module


def revert(module: torch.nn.Module) -> torch.nn.Module:
    """Make every fastbn BatchNorm in module torch's own again, in place; return module.

    A BatchNormReLU that `convert` fused (followed by Identity in a
    Sequential) gets its nn.ReLU back; one made directly is left alone.
    """
    _swap_pairs(module, _UNFUSED, torch.nn.Identity, _relu_for)
    torch_table = _torch_table()
    _replace(module, torch_table)
    for layer in module.modules():
        if type(layer) in torch_table.values():  # theirs again: without fastbn's attribute
            layer.__dict__.pop("implementation", None)
    return module
