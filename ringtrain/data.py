"""Datasets and the sharded loader.

    digits     scikit-learn's copy of the UCI handwritten digits (1797 real 8x8 images, 10
               classes), shipped inside the scikit-learn wheel: nothing is downloaded. Default.
    cifar10    CIFAR-10, python format, read from --data-dir (data_batch_1..5, test_batch).
    cinic10    CINIC-10, folder format, read from --data-dir (train/ valid/ test/, a folder per class).
    synthetic  random images of any shape (--synthetic-shape), for benchmarks.

Every dataset is held in memory as tensors; each rank then iterates over only its own shard
(ShardedLoader), shuffled by the epoch seed and padded like torch's DistributedSampler.
"""
from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CINIC_MEAN = (0.47889522, 0.47227842, 0.43047404)
CINIC_STD = (0.24205776, 0.23828046, 0.25874835)


class DatasetError(ValueError):
    """A dataset is missing or malformed. The message says which file and what to do."""


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # float32, (n, C, H, W), normalised
    y_train: torch.Tensor  # int64, (n,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int

    @property
    def shape(self):
        return tuple(self.x_train.shape[1:])


def load_dataset(name: str, data_dir: str | None = None, synthetic_shape=(3, 32, 32), synthetic_samples=2048, seed=0) -> Dataset:
    if name == "digits":
        return load_digits()
    if name == "cifar10":
        return load_cifar10(_require_dir(name, data_dir))
    if name == "cinic10":
        return load_cinic10(_require_dir(name, data_dir))
    if name == "synthetic":
        return make_synthetic(tuple(synthetic_shape), synthetic_samples, seed=seed)
    raise DatasetError(f"unknown dataset {name!r}; choose one of: digits, cifar10, cinic10, synthetic")


DATASETS = ("digits", "cifar10", "cinic10", "synthetic")


def _require_dir(name, data_dir):
    if not data_dir:
        raise DatasetError(f"--dataset {name} needs --data-dir DIR pointing at the extracted dataset")
    if not os.path.isdir(data_dir):
        raise DatasetError(f"--data-dir {data_dir!r} does not exist or is not a directory (dataset {name})")
    return data_dir


def load_digits() -> Dataset:
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    y = torch.tensor(d.target, dtype=torch.int64)
    # A fixed split: the last 297 images (about a sixth) are held out.
    n_test = 297
    return Dataset("digits", x[:-n_test], y[:-n_test], x[-n_test:], y[-n_test:], 10)


class _ArraysOnly(pickle.Unpickler):
    """CIFAR-10's python format is a pickle. Unpickling runs arbitrary code by design, so only
    the few classes that a genuine CIFAR batch contains are allowed."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of the CIFAR-10 format")


def _read_cifar_batch(path):
    try:
        with open(path, "rb") as f:
            d = _ArraysOnly(io.BytesIO(f.read()), encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise DatasetError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
        raise DatasetError(f"{path}: expected data of shape (n, 3072) and n labels, got {data.shape} and {len(labels)}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _normalise(x_uint8: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(x_uint8).float().div_(255.0)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def load_cifar10(root: str) -> Dataset:
    # Accept the directory itself or its parent holding cifar-10-batches-py/.
    if os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        root = os.path.join(root, "cifar-10-batches-py")
    train_files = [os.path.join(root, f"data_batch_{i}") for i in range(1, 6)]
    test_file = os.path.join(root, "test_batch")
    missing = [f for f in train_files + [test_file] if not os.path.isfile(f)]
    if missing:
        raise DatasetError(
            f"{root}: not a CIFAR-10 python-format directory; missing {', '.join(os.path.basename(m) for m in missing)} "
            f"(expected data_batch_1..5 and test_batch from cifar-10-python.tar.gz)"
        )
    parts = [_read_cifar_batch(f) for f in train_files]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = _read_cifar_batch(test_file)
    return Dataset(
        "cifar10", _normalise(xtr, CIFAR_MEAN, CIFAR_STD), torch.from_numpy(ytr),
        _normalise(xte, CIFAR_MEAN, CIFAR_STD), torch.from_numpy(yte), 10,
    )


def _read_image_folder(split_dir):
    from PIL import Image

    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    if not classes:
        raise DatasetError(f"{split_dir}: no class folders (expected one folder per class, e.g. airplane/ automobile/ ...)")
    xs, ys = [], []
    for k, c in enumerate(classes):
        folder = os.path.join(split_dir, c)
        for fn in sorted(os.listdir(folder)):
            path = os.path.join(folder, fn)
            try:
                with Image.open(path) as im:
                    a = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except Exception as e:
                raise DatasetError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
            if a.shape != (32, 32, 3):
                raise DatasetError(f"{path}: expected a 32x32 RGB image, got shape {a.shape}")
            xs.append(a.transpose(2, 0, 1))
            ys.append(k)
    if not xs:
        raise DatasetError(f"{split_dir}: the class folders hold no images")
    return classes, np.stack(xs), np.asarray(ys, dtype=np.int64)


def load_cinic10(root: str) -> Dataset:
    splits = {s: os.path.join(root, s) for s in ("train", "valid", "test")}
    missing = [s for s, p in splits.items() if not os.path.isdir(p)]
    if missing:
        raise DatasetError(f"{root}: not a CINIC-10 directory; missing {', '.join(m + '/' for m in missing)} (expected train/ valid/ test/)")
    c_tr, xtr, ytr = _read_image_folder(splits["train"])
    c_te, xte, yte = _read_image_folder(splits["test"])
    if c_tr != c_te:
        raise DatasetError(f"{root}: train/ and test/ have different class folders ({c_tr} vs {c_te})")
    return Dataset(
        "cinic10", _normalise(xtr, CINIC_MEAN, CINIC_STD), torch.from_numpy(ytr),
        _normalise(xte, CINIC_MEAN, CINIC_STD), torch.from_numpy(yte), len(c_tr),
    )


def make_synthetic(shape, samples=2048, classes=10, seed=0) -> Dataset:
    if len(shape) != 3 or min(shape) < 1:
        raise DatasetError(f"--synthetic-shape must be C,H,W with positive sizes, got {shape}")
    g = torch.Generator().manual_seed(seed)
    n_test = max(classes, samples // 8)
    x = torch.randn((samples + n_test, *shape), generator=g)
    y = torch.randint(0, classes, (samples + n_test,), generator=g)
    return Dataset("synthetic", x[:samples], y[:samples], x[samples:], y[samples:], classes)


class ShardedLoader:
    """This rank's shard of a dataset, in batches. Same contract as DistributedSampler:

    - every epoch the whole index range is permuted with seed + epoch (identical on all ranks);
    - it is padded by repeating its first indices to a multiple of num_shards, so every rank
      gets exactly ceil(n / num_shards) samples and runs the same number of steps;
    - rank r takes indices[r::num_shards].

    Consequence used by the sync-equivalence test: the union of the N ranks' batch j is
    exactly batch j of a single process with batch size N·b over the same permutation.
    """

    def __init__(self, x, y, batch_size, shard, num_shards, seed=0, shuffle=True):
        if num_shards < 1 or not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} of {num_shards} is out of range")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shard, self.num_shards = shard, num_shards
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.shard_size = -(-len(x) // num_shards)
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if batch_size > self.shard_size:
            raise ValueError(
                f"batch size {batch_size} per rank is larger than each rank's shard of {self.shard_size} samples "
                f"({len(x)} samples over {num_shards} ranks); use --batch-size <= {self.shard_size} or fewer ranks"
            )

    def reshard(self, shard: int, num_shards: int) -> None:
        """Take shard `shard` of `num_shards` from now on (elastic training after a rank loss)."""
        self.shard, self.num_shards = shard, num_shards
        self.shard_size = -(-len(self.x) // num_shards)
        if self.batch_size > self.shard_size:
            raise ValueError(f"batch size {self.batch_size} is larger than the new shard of {self.shard_size} samples")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        n = len(self.x)
        if self.shuffle:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            idx = torch.arange(n)
        total = self.shard_size * self.num_shards
        if total > n:
            idx = idx.repeat(-(-total // n))[:total]
        return idx[self.shard :: self.num_shards]

    def __len__(self) -> int:
        return -(-self.shard_size // self.batch_size)

    def __iter__(self):
        idx = self.indices()
        for i in range(0, len(idx), self.batch_size):
            j = idx[i : i + self.batch_size]
            yield self.x[j], self.y[j]
