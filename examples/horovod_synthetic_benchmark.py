"""Training throughput on synthetic data with Horovod's API (images per second per rank).

    mpirun -n 2 python examples/horovod_synthetic_benchmark.py                          # ringtrain.horovod
    RINGTRAIN_HOROVOD=real mpirun -n 2 python examples/horovod_synthetic_benchmark.py   # Horovod
    horovodrun -np 2 --binding-args="--bind-to none --map-by slot" \
        python examples/horovod_synthetic_benchmark.py --model resnet18

The output has the shape of Horovod's pytorch_synthetic_benchmark.py ("Img/sec per GPU",
"Total img/sec on N GPU(s)"; CPU in place of GPU when there is none), so numbers can be
set side by side. What is timed: --num-batches-per-iter steps of forward, backward,
gradient all-reduce and SGD step, after --num-warmup-batches untimed ones. The batch is
the same random tensor every step, so no data loading is measured. The +- is 1.96 standard
deviations of the per-iteration rate (a 95% interval if iterations were independent).
"""
import argparse
import timeit

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import ringtrain.horovod as hvd  # drop-in for: import horovod.torch as hvd

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--model", default="convnet", help="convnet (small, the default), or any model of "
                    "ringtrain.models: resnet18, resnet50, alexnet, cnn, mlp")
parser.add_argument("--batch-size", type=int, default=32, help="per rank")
parser.add_argument("--image-size", type=int, default=32)
parser.add_argument("--num-classes", type=int, default=10)
parser.add_argument("--num-warmup-batches", type=int, default=5)
parser.add_argument("--num-batches-per-iter", type=int, default=5)
parser.add_argument("--num-iters", type=int, default=5)
parser.add_argument("--fp16-allreduce", action="store_true")
parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (ranks share the cores)")
parser.add_argument("--no-cuda", action="store_true")
args = parser.parse_args()


class ConvNet(nn.Module):
    """A small CIFAR-sized CNN (about 0.3 M parameters): quick on a CPU."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def make_model(name, num_classes):
    if name == "convnet":
        return ConvNet(num_classes)
    from ringtrain.models import build_model

    return build_model(name, (3, args.image_size, args.image_size), num_classes)


def log(s):
    if hvd.rank() == 0:
        print(s, flush=True)


def main():
    hvd.init()
    cuda = not args.no_cuda and torch.cuda.is_available()
    torch.set_num_threads(args.threads)
    if cuda:
        torch.cuda.set_device(hvd.local_rank())
    device_name = "GPU" if cuda else "CPU"

    model = make_model(args.model, args.num_classes)
    if cuda:
        model.cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size())
    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), compression=compression)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    torch.manual_seed(1234 + hvd.rank())
    data = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    target = torch.randint(0, args.num_classes, (args.batch_size,))
    if cuda:
        data, target = data.cuda(), target.cuda()

    def benchmark_step():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data), target)
        loss.backward()
        optimizer.step()

    params = sum(p.numel() for p in model.parameters())
    log(f"Model: {args.model} ({params / 1e6:.2f} M parameters)")
    log(f"Batch size: {args.batch_size}")
    log(f"Number of {device_name}s: {hvd.size()}")
    log(f"Allreduce: {'Horovod' if not hasattr(hvd, 'comm_stats') else 'ringtrain ring'}")

    log("Running warmup...")
    timeit.timeit(benchmark_step, number=args.num_warmup_batches)

    log("Running benchmark...")
    img_secs = []
    for x in range(args.num_iters):
        t = timeit.timeit(benchmark_step, number=args.num_batches_per_iter)
        img_sec = args.batch_size * args.num_batches_per_iter / t
        log(f"Iter #{x}: {img_sec:.1f} img/sec per {device_name}")
        img_secs.append(img_sec)

    img_sec_mean = np.mean(img_secs)
    img_sec_conf = 1.96 * np.std(img_secs)
    log(f"Img/sec per {device_name}: {img_sec_mean:.1f} +-{img_sec_conf:.1f}")
    log(f"Total img/sec on {hvd.size()} {device_name}(s): {hvd.size() * img_sec_mean:.1f} +-{hvd.size() * img_sec_conf:.1f}")


if __name__ == "__main__":
    main()
