"""Data-parallel training on the UCI digits (8x8 images, 10 classes) with Horovod's API.

Runs unchanged on ringtrain's ring or on Horovod itself; only the import line differs:

    mpirun -n 2 python examples/horovod_digits.py                          # ringtrain.horovod
    RINGTRAIN_HOROVOD=real mpirun -n 2 python examples/horovod_digits.py   # Horovod, same line
    horovodrun -np 2 --binding-args="--bind-to none --map-by slot" python examples/horovod_digits.py

(or replace the import below with `import horovod.torch as hvd`). The data ships with
scikit-learn, so nothing is downloaded. Each rank trains on its shard of every epoch
(DistributedSampler); gradients are averaged by DistributedOptimizer, so N ranks with batch b
take the same steps as one process with batch N*b. --save PATH writes rank 0's final
parameters, to compare runs.
"""
import argparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import ringtrain.horovod as hvd  # drop-in for: import horovod.torch as hvd

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--batch-size", type=int, default=32, help="per rank")
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--lr", type=float, default=0.025, help="for one rank; scaled by the number of ranks")
parser.add_argument("--momentum", type=float, default=0.9)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--fp16-allreduce", action="store_true", help="send gradients as float16")
parser.add_argument("--backward-passes-per-step", type=int, default=1, help="local accumulation before each exchange")
parser.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (0: full epochs)")
parser.add_argument("--save", default="", help="write rank 0's final parameters (torch.save) here")
args = parser.parse_args()


class Net(nn.Module):
    """A small CNN for 1x8x8 inputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 16 x 4 x 4
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 32 x 2 x 2
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


def load(split_seed=0):
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    x = (x - 0.3) / 0.4  # roughly zero mean, unit variance: SGD starts learning at once
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = np.random.RandomState(split_seed).permutation(len(y))  # the same split on every rank
    test, train = order[:360], order[360:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def metric_average(value, name):
    return hvd.allreduce(torch.tensor(float(value)), name=name).item()


def main():
    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # ranks share the machine's cores

    train_set, test_set = load()
    # DistributedSampler pads so every rank runs the same number of steps.
    train_sampler = DistributedSampler(train_set, num_replicas=hvd.size(), rank=hvd.rank(), seed=args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler)
    test_sampler = DistributedSampler(test_set, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=False)
    test_loader = DataLoader(test_set, batch_size=256, sampler=test_sampler)

    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=args.momentum)
    # Every rank starts from rank 0's weights and optimizer state.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
    optimizer = hvd.DistributedOptimizer(
        optimizer,
        named_parameters=model.named_parameters(),
        compression=compression,
        backward_passes_per_step=args.backward_passes_per_step,
    )

    k = args.backward_passes_per_step
    for epoch in range(1, args.epochs + 1):
        model.train()
        train_sampler.set_epoch(epoch)
        for i, (data, target) in enumerate(train_loader):
            if args.max_steps and i >= args.max_steps * k:
                break
            if i % k == 0:
                optimizer.zero_grad()
            # Sum over the k passes, as Horovod does: scale the loss to average them.
            loss = F.nll_loss(model(data), target) / k
            loss.backward()
            if i % k == k - 1:
                optimizer.step()

        model.eval()
        test_loss = correct = seen = 0.0
        with torch.no_grad():
            for data, target in test_loader:
                out = model(data)
                test_loss += F.nll_loss(out, target, reduction="sum").item()
                correct += (out.argmax(1) == target).sum().item()
                seen += len(target)
        test_loss = metric_average(test_loss / seen, "avg_loss")
        accuracy = metric_average(correct / seen, "avg_accuracy")
        if hvd.rank() == 0:
            print(f"epoch {epoch}: test loss {test_loss:.4f}, accuracy {100 * accuracy:.1f}% ({hvd.size()} ranks)", flush=True)

    if args.save and hvd.rank() == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.save)
    if hasattr(hvd, "comm_stats") and hvd.rank() == 0:  # ringtrain.horovod only
        s = hvd.comm_stats()
        print(f"rank 0: {s['ops']} collectives, {s['t_comm']:.3f} s communicating, {s['bytes_sent']} bytes sent")


if __name__ == "__main__":
    main()
