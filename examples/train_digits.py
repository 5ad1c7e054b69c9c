"""Train a 3-hidden-layer MLP on handwritten digits, with and without batch norm
=============================================================================

scikit-learn's bundled 8x8 digits (1347 training and 450 test images, no
download) and a 64-128-128-128-10 ReLU network in ``fastbn.nn``, trained with
plain mini-batch SGD (batches of 32, 30 epochs) at two learning rates. The
batch-norm network has a ``fastbn.BatchNorm`` after each hidden Dense, whose
bias it drops (beta replaces it). Test accuracy is measured in eval mode,
with the running statistics. It writes ``train_digits.png``: training loss
and test accuracy per epoch for the four runs.

Measured on the 2-core CI machine (seed 0; 5 seconds), test accuracy after
the last epoch:

=========================  ==============  =============================
run                        test accuracy   first epoch at >= 95% test
=========================  ==============  =============================
lr 0.1, no batch norm      0.978           4
lr 0.1, batch norm         0.989           2
lr 1.0, no batch norm      diverged        never (in epoch 1)
lr 1.0, batch norm         0.987           2
=========================  ==============  =============================

Batch norm reaches 95% in half the epochs at lr 0.1 and ends about one point
higher (98.9% against 97.8%). At lr 1.0 the plain network diverges (its loss
stops being finite) in the first epoch, while with batch norm it trains as
well as at lr 0.1: normalizing each layer's pre-activations keeps a large
step from blowing up the next layer's inputs, so a larger learning rate
becomes usable.

Run ``python examples/train_digits.py [--out DIR]``; ``--quick`` trains a
small network for two epochs (the smoke test).
"""

import math
import time

import matplotlib.pyplot as plt
import numpy as np
from _common import accuracy, digits, mlp, parse_args, save_figure, train_epoch

import fastbn.nn as nn

LEARNING_RATES = (0.1, 1.0)
BATCH_SIZE = 32


def run(X_train, y_train, X_test, y_test, *, batch_norm, lr, hidden, epochs, seed):
    """Train one network; return its training loss and test accuracy per epoch.

    A run whose loss stops being finite (or whose batch statistics do) has
    diverged: it stops there, and its remaining epochs are NaN. The third
    value returned is the epoch it diverged in, or None.
    """
    rng = np.random.default_rng(seed)
    model = mlp(X_train.shape[0], hidden, 10, batch_norm=batch_norm, rng=rng)
    optimizer = nn.SGD(model.parameters(), lr)
    losses = np.full(epochs, np.nan)
    accuracies = np.full(epochs, np.nan)
    # A diverging network overflows on the way; the loss check below reports it.
    with np.errstate(over="ignore", invalid="ignore"):
        for epoch in range(epochs):
            try:
                loss = train_epoch(model, optimizer, X_train, y_train, BATCH_SIZE, rng)
            except FloatingPointError:  # BatchNorm refuses non-finite batch statistics
                loss = math.nan
            if not math.isfinite(loss):
                print(f"    diverged in epoch {epoch + 1}")
                return losses, accuracies, epoch + 1
            losses[epoch] = loss
            accuracies[epoch] = accuracy(model, X_test, y_test)
            print(
                f"    epoch {epoch + 1:2d}: loss {loss:.4f}, test accuracy {accuracies[epoch]:.4f}"
            )
    return losses, accuracies, None


def first_epoch_at(accuracies, level):
    """The first epoch (from 1) whose accuracy is at least level, or None."""
    reached = np.flatnonzero(accuracies >= level)
    return int(reached[0]) + 1 if reached.size else None


def main():
    args = parse_args(__doc__.partition("\n")[0])
    hidden, epochs = (16, 2) if args.quick else (128, 30)
    X_train, y_train, X_test, y_test = digits()
    start = time.perf_counter()

    results = {}
    for lr in LEARNING_RATES:
        for batch_norm in (False, True):
            label = f"lr {lr}, {'batch norm' if batch_norm else 'no batch norm'}"
            print(f"{label}:", flush=True)
            results[lr, batch_norm] = run(
                X_train, y_train, X_test, y_test,
                batch_norm=batch_norm, lr=lr, hidden=hidden, epochs=epochs, seed=0,
            )  # fmt: skip

    print(f"\n{'run':<26} {'final test acc':>14} {'epoch at 95%':>13}")
    for (lr, batch_norm), (_, accuracies, _) in results.items():
        label = f"lr {lr}, {'batch norm' if batch_norm else 'no batch norm'}"
        final = accuracies[-1]
        reached = first_epoch_at(accuracies, 0.95)
        print(f"{label:<26} {final:>14.4f} {reached if reached else 'never':>13}")

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epoch_numbers = np.arange(1, epochs + 1)
    for (lr, batch_norm), (losses, accuracies, diverged) in results.items():
        label = f"lr {lr}, {'batch norm' if batch_norm else 'no batch norm'}"
        style = {
            "color": "tab:blue" if batch_norm else "tab:red",
            "linestyle": "-" if lr == LEARNING_RATES[1] else "--",
            "label": label + (f" (diverged in epoch {diverged})" if diverged else ""),
        }
        ax_loss.plot(epoch_numbers, losses, **style)
        ax_acc.plot(epoch_numbers, accuracies, **style)
    ax_loss.set(xlabel="epoch", ylabel="training loss (mean over the epoch)", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (eval mode)", ylim=(0.8, 1.0))
    ax_acc.axhline(0.95, color="gray", linewidth=0.5)
    ax_acc.legend(loc="lower right")
    fig.suptitle("Digits, 3-hidden-layer MLP, mini-batch SGD")
    save_figure(fig, args.out, "train_digits.png", start)


if __name__ == "__main__":
    main()
