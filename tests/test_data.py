"""Datasets in their real on-disk formats, and the sharded loader's contract."""
import os
import pickle

import numpy as np
import pytest
import torch

from ringtrain.data import DatasetError, ShardedLoader, load_dataset


def write_cifar(root, n=20):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(d, f, protocol=2)


def write_cinic(root, per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "valid", "test"):
        for c in ("airplane", "automobile", "bird"):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(root, split, c, f"{i}.png"))


def test_digits_ships_with_the_install():
    d = load_dataset("digits")
    assert d.shape == (1, 8, 8) and d.classes == 10
    assert len(d.x_train) == 1500 and len(d.x_test) == 297


def test_cifar10_python_format(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    d = load_dataset("cifar10", str(tmp_path))  # the parent directory works too
    assert d.x_train.shape == (100, 3, 32, 32) and d.x_test.shape == (20, 3, 32, 32)
    assert d.y_train.dtype == torch.int64 and d.classes == 10
    # The R plane comes first in CIFAR's 3072 bytes.
    raw = pickle.load(open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb"), encoding="bytes")[b"data"][0]
    assert abs(float(d.x_train[0, 0, 0, 0]) * 0.2470 + 0.4914 - raw[0] / 255.0) < 1e-5


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(DatasetError, match="refusing to load"):
        load_dataset("cifar10", str(tmp_path))


def test_cinic10_folder_format(tmp_path):
    write_cinic(tmp_path)
    d = load_dataset("cinic10", str(tmp_path))
    assert d.x_train.shape == (9, 3, 32, 32) and d.classes == 3
    assert sorted(d.y_train.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_cinic10_missing_split(tmp_path):
    write_cinic(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "valid")
    with pytest.raises(DatasetError, match="missing valid/"):
        load_dataset("cinic10", str(tmp_path))


def test_missing_data_dir():
    with pytest.raises(DatasetError, match="needs --data-dir"):
        load_dataset("cifar10", None)


@pytest.mark.parametrize("n,shards", [(10, 3), (1500, 4), (7, 7), (5, 8)])
def test_shards_are_disjoint_padded_and_equal(n, shards):
    x, y = torch.arange(n).float().view(n, 1, 1, 1), torch.arange(n)
    loaders = [ShardedLoader(x, y, 1, r, shards, seed=3) for r in range(shards)]
    parts = [l.indices() for l in loaders]
    assert len({len(p) for p in parts}) == 1  # every rank runs the same number of steps
    allidx = torch.cat(parts)
    assert set(allidx.tolist()) == set(range(n))  # everything is seen
    assert len(allidx) - n < shards  # padding is less than one sample per rank
    for l in loaders:
        l.set_epoch(1)
    assert not torch.equal(torch.cat([l.indices() for l in loaders]), allidx) or n < 3  # reshuffled per epoch


def test_union_of_rank_batches_is_the_big_batch():
    n, shards, b = 60, 3, 4
    x, y = torch.arange(n).float().view(n, 1, 1, 1), torch.arange(n)
    one = list(ShardedLoader(x, y, b * shards, 0, 1, seed=5))
    many = [list(ShardedLoader(x, y, b, r, shards, seed=5)) for r in range(shards)]
    for j in range(len(one)):
        union = torch.cat([many[r][j][1] for r in range(shards)])
        assert sorted(union.tolist()) == sorted(one[j][1].tolist())
