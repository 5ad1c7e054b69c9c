"""Data-parallel training on CPUs: DistributedDataParallel with fastbn's SyncBatchNorm
===================================================================================

A small CNN (conv-BN-ReLU twice, then a linear layer) learns scikit-learn's
8x8 digits on several processes over ``torch.distributed`` (gloo): every
process holds a replica of the model and its share of each batch. With the
model's BatchNorm2d layers converted to ``fastbn.torch.SyncBatchNorm``, they
normalize with the statistics of the whole batch, not of each process's
share, so data-parallel training is one-process training on the whole
batches, to rounding. PyTorch's own SyncBatchNorm refuses CPU tensors, and
DistributedDataParallel refuses it in CPU modules.

Rank 0 prints the loss and test accuracy (eval mode: the running
statistics, identical on every rank) per epoch of two data-parallel runs,
one with SyncBatchNorm and one with per-process BatchNorm2d (fastbn's),
then trains the same model with torch's own BatchNorm2d in one process on
the same whole batches, step for step, and compares. It writes
``ddp_syncbn.png``: the three runs' loss and accuracy per epoch.

Measured on the 2-core CI machine: 2 processes, batches of 64 (32 per
process), SGD with momentum, 15 epochs of 21 steps (seed 0; 15 seconds in
all, start-up included):

====================================  =============  ==============  =============
run                                   loss, epoch 1  loss, epoch 15  test accuracy
====================================  =============  ==============  =============
2 processes, SyncBatchNorm            0.6655         0.0017          0.9822
2 processes, per-process BatchNorm2d  0.6673         0.0017          0.9822
one process, whole batches            0.6655         0.0017          0.9822
====================================  =============  ==============  =============

Largest differences from the one-process run: with SyncBatchNorm, 2.1e-07 in
the epoch losses and 1.0e-03 (relative to each tensor's largest value) in
the parameters and running statistics in float32, where the runs sum in
different orders and 315 SGD steps carry the rounding along; 1.2e-16 and
5.0e-15 with ``--dtype float64``. With per-process BatchNorm2d: 2.5e-03 and
0.14, in either dtype. On this easy task both reach the same accuracy; the
synchronized run is the one-process run.

Run ``torchrun --nproc_per_node=2 examples/ddp_syncbn.py [--out DIR]``, or
``python examples/ddp_syncbn.py`` to have it start 2 processes itself
(``--procs N``). On several machines, the same script under torchrun's
``--nnodes`` and ``--rdzv-endpoint``. ``--quick`` trains for two epochs on
512 of the training images (the smoke test).
"""

import argparse
import gc
import os
import socket
import time

import matplotlib.pyplot as plt
import numba
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import digits, save_figure
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fastbn.torch as fbt

GLOBAL_BATCH = 64
LEARNING_RATE = 0.05
SEED = 0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two epochs on part of the data")
    parser.add_argument("--out", default=".", help="folder to write the PNG plot into")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument(
        "--procs", type=int, default=2, help="processes to start when not run by torchrun"
    )
    return parser.parse_args()


def load_digits_images(quick):
    """(train images, train labels, test images, test labels): (N, 1, 8, 8) in [0, 1]."""
    X_train, y_train, X_test, y_test = digits(seed=SEED)  # features-first (64, N)
    images = [torch.from_numpy(X.T.copy()).reshape(-1, 1, 8, 8) for X in (X_train, X_test)]
    labels = [torch.from_numpy(y).long() for y in (y_train, y_test)]
    if quick:
        images[0], labels[0] = images[0][:512], labels[0][:512]
    return images[0], labels[0], images[1], labels[1]


def make_model(dtype):
    """conv(16)-BN-ReLU, conv(32, stride 2)-BN-ReLU, linear; seeded: every replica starts alike."""
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    ).to(dtype)


def batches(n, epoch):
    """The index sets of one epoch's whole batches: a seeded shuffle, the same on every rank."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SEED * 1000 + epoch))
    for start in range(0, n - GLOBAL_BATCH + 1, GLOBAL_BATCH):  # drop_last
        yield order[start : start + GLOBAL_BATCH]


def accuracy(model, images, labels):
    model.eval()
    with torch.no_grad():
        correct = (model(images).argmax(1) == labels).double().mean().item()
    model.train()
    return correct


def train(model, data, epochs, dtype, rank=0, world=1):
    """Train model (DDP-wrapped when world > 1) on rank's share of each batch.

    Returns the mean loss over each epoch's whole batches and the test
    accuracy after each epoch (evaluated on rank 0 only; NaN elsewhere).
    """
    train_x, train_y, test_x, test_y = data
    train_x, test_x = train_x.to(dtype), test_x.to(dtype)
    inner = model.module if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    share = GLOBAL_BATCH // world
    losses, accuracies = [], []
    for epoch in range(epochs):
        total, steps = torch.zeros((), dtype=torch.float64), 0
        for batch in batches(len(train_y), epoch):
            mine = batch[rank * share : (rank + 1) * share]
            optimizer.zero_grad()
            # Each rank's loss is the mean over its share; DDP averages the
            # gradients, which makes them the whole batch's (equal shares).
            loss = nn.functional.cross_entropy(model(train_x[mine]), train_y[mine])
            loss.backward()
            optimizer.step()
            total += loss.detach().double()
            steps += 1
        if world > 1:
            dist.all_reduce(total)  # the whole batches' loss: the mean of the shares'
            total /= world
        losses.append(total.item() / steps)
        accuracies.append(accuracy(inner, test_x, test_y) if rank == 0 else float("nan"))
        if rank == 0:
            print(
                f"  epoch {epoch + 1:2d}: loss {losses[-1]:.4f}, "
                f"test accuracy {accuracies[-1]:.4f}",
                flush=True,
            )
    return losses, accuracies


def run(rank, world, args, start):
    """One process's part: the data-parallel runs, then (rank 0) the comparison and the plot."""
    if GLOBAL_BATCH % world:
        raise SystemExit(f"{world} processes cannot share batches of {GLOBAL_BATCH} equally")
    # The cores shared out: torch's and fastbn's (Numba's) threads per process.
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    dtype = getattr(torch, args.dtype)
    data = load_digits_images(args.quick)
    epochs = 2 if args.quick else args.epochs
    dist.init_process_group("gloo", rank=rank, world_size=world)

    runs = {}
    for name, convert in (
        (f"{world} processes, DDP + fastbn SyncBatchNorm", synchronized),
        (f"{world} processes, DDP + per-process BatchNorm2d", fbt.convert),
    ):
        model = convert(make_model(dtype))
        if rank == 0:
            print(f"{name} ({GLOBAL_BATCH // world} examples per process):", flush=True)
        ddp = DistributedDataParallel(model)
        runs[name] = (model, *train(ddp, data, epochs, dtype, rank, world))
        del ddp
    # DDP's reducer holds gloo work and reference cycles: free it while the
    # group lives, or its destructor may run at exit and abort the process.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return

    print(f"one process, whole batches of {GLOBAL_BATCH}, torch.nn.BatchNorm2d:", flush=True)
    reference = make_model(dtype)
    _, ref_losses, ref_accuracies = runs["one process, whole batches, torch BatchNorm2d"] = (
        reference,
        *train(reference, data, epochs, dtype),
    )
    print(f"\nagainst one process on the whole batches ({args.dtype}):")
    for name, (model, losses, accuracies) in list(runs.items())[:2]:
        loss_gap = max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))
        ours, theirs = model.state_dict(), reference.state_dict()
        # Relative to each tensor's largest value: parameters and running statistics.
        state_gap = max(
            (
                (ours[k].double() - theirs[k].double()).abs().max()
                / theirs[k].double().abs().max()
            ).item()
            for k in theirs
        )
        print(
            f"  {name}: largest difference {loss_gap:.1e} in the epoch losses, {state_gap:.1e} "
            f"(relative) in the parameters and running statistics; final test accuracy "
            f"{accuracies[-1]:.4f} against {ref_accuracies[-1]:.4f}"
        )
    plot(runs, args.out, start)


def synchronized(model):
    """model with every BatchNorm layer made a SyncBatchNorm (over the default group)."""
    return fbt.SyncBatchNorm.convert_sync_batchnorm(model)


def plot(runs, out, start):
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for (name, (_, losses, accuracies)), style in zip(
        runs.items(), ("o-", "s:", "x--"), strict=True
    ):
        epochs = np.arange(1, len(losses) + 1)
        ax_loss.plot(epochs, losses, style, label=name)
        ax_acc.plot(epochs, accuracies, style, label=name)
    ax_loss.set(xlabel="epoch", ylabel="training loss (mean over the epoch)", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (eval mode)")
    ax_acc.legend(loc="lower right", fontsize="small")
    fig.suptitle("Digits CNN, data-parallel: synchronized batch norm is one-process training")
    os.makedirs(out, exist_ok=True)
    save_figure(fig, out, "ddp_syncbn.png", start)


def spawned(rank, world, port, args, start):
    """Entry of a process started by `main` (no torchrun): torchrun's environment, by hand."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    run(rank, world, args, start)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    args = parse_args()
    start = time.perf_counter()
    if "WORLD_SIZE" in os.environ:  # started by torchrun, which sets the rank and rendezvous
        run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, start)
    else:
        mp.spawn(spawned, args=(args.procs, free_port(), args, start), nprocs=args.procs)


if __name__ == "__main__":
    main()
