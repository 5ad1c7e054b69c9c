"""Forward-mode AD through two batch norm modules and two batch_norm functions.

Shared by tests/test_torch_workflows.py and tests/test_torch_compat.py, which
compare fastbn's results with torch's under different mechanisms.
"""

import torch.autograd.forward_ad as fwAD


def forward_ad_runs(modules, functions, x, tx, tw, tb, training):
    """Primal and tangent of each module's output, then of each function's (tangents on
    weight and bias too; running statistics from the last module, cloned per call)."""
    runs = []
    with fwAD.dual_level():
        for module in modules:
            y = fwAD.unpack_dual(module(fwAD.make_dual(x, tx)))
            runs.append({"y": y.primal.detach(), "tangent": y.tangent})
        source = modules[-1]
        for fn in functions:
            rm, rv = source.running_mean.clone(), source.running_var.clone()
            w = fwAD.make_dual(source.weight.detach(), tw)
            b = fwAD.make_dual(source.bias.detach(), tb)
            y = fwAD.unpack_dual(fn(fwAD.make_dual(x, tx), rm, rv, w, b, training))
            runs.append({"y": y.primal.detach(), "tangent": y.tangent, "rm": rm, "rv": rv})
    return runs
