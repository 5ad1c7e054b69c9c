"""What the examples share: the digits data, the MLP, one epoch of training, accuracy.

Not an example itself; each example imports it from its own folder.
"""

import argparse
import os
import time

import matplotlib

# Agg draws to files only: the examples run on machines without a display.
matplotlib.use("Agg")

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

import fastbn
import fastbn.nn as nn

# The examples' matrices (at most 128 x 450) are too small to gain from BLAS
# threads, and on a busy 2-core machine BLAS threads waiting for a core made
# train_digits.py 5x slower (16 s instead of 3 s).
threadpool_limits(limits=1, user_api="blas")


def parse_args(description):
    """Parse the examples' common flags: --quick (a tiny configuration) and --out (a folder)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny configuration that runs in seconds (the smoke tests use it)",
    )
    parser.add_argument("--out", default=".", help="folder to write the PNG plots into")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    return args


def digits(seed=0):
    """Return X_train, y_train, X_test, y_test: the 8x8 digits, features-first, float32.

    scikit-learn's bundled copy (1797 images, no download), pixel values
    scaled from 0..16 to 0..1, split 75/25 with every class in proportion.
    """
    images, labels = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, stratify=labels, random_state=seed
    )
    # The notes' layout: one column per example.
    return (
        np.ascontiguousarray(X_train.T / 16, dtype=np.float32),
        y_train,
        np.ascontiguousarray(X_test.T / 16, dtype=np.float32),
        y_test,
    )


def mlp(n_in, hidden, n_classes, *, batch_norm, rng, momentum=0.1):
    """Return an MLP with three hidden ReLU layers of ``hidden`` units.

    With batch_norm, each hidden Dense has no bias and is followed by a
    BatchNorm (whose beta replaces the bias), as the notes prescribe.
    """
    layers = []
    width = n_in
    for _ in range(3):
        if batch_norm:
            layers += [
                nn.Dense(width, hidden, bias=False, rng=rng),
                fastbn.BatchNorm(hidden, momentum=momentum),
            ]
        else:
            layers.append(nn.Dense(width, hidden, rng=rng))
        layers.append(nn.ReLU())
        width = hidden
    layers.append(nn.Dense(width, n_classes, rng=rng))
    return nn.Sequential(*layers)


def train_epoch(model, optimizer, X, y, batch_size, rng):
    """Train for one epoch of shuffled mini-batches; return the mean training loss."""
    loss_fn = nn.SoftmaxCrossEntropy()
    model.train()
    losses = []
    # drop_last: a last batch of one example cannot be batch-normalized.
    for X_batch, y_batch in nn.minibatches(X, y, batch_size, rng, drop_last=True):
        loss, dlogits = loss_fn(model(X_batch), y_batch)
        model.backward(dlogits)
        optimizer.step()
        losses.append(loss)
    return float(np.mean(losses))


def accuracy(model, X, y):
    """Return the fraction of columns of X classified as y, in eval mode (running statistics)."""
    model.eval()
    predicted = model(X).argmax(axis=0)
    model.train()
    return float(np.mean(predicted == y))


def save_figure(fig, out_dir, name, start):
    """Write fig as out_dir/name and say where, with the seconds since ``start``."""
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=80)
    print(f"\nwrote {path} ({time.perf_counter() - start:.1f} s)")
