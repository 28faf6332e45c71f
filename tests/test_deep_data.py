"""The image loader and the client partitioners of ``hbfl_pyro.deep.data``.

Partitions are checked on the real MNIST test set (../shared/data/mnist_t10k): sizes, the
balanced global test, disjointness, label mixes of train/test splits, the skew that each
scheme promises, the rotations, and that the same seed gives the same split.
"""

import gzip
import shutil
import struct
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hbfl_pyro.deep.data import load_images, load_mnist, partition, read_idx


@pytest.fixture(scope="module")
def mnist():
    from conftest import SHARED_DATA

    directory = SHARED_DATA / "mnist_t10k"
    if not directory.exists():
        pytest.fail(f"{directory} is missing: the deep tests read the MNIST test set")
    return load_mnist(directory)


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_read_idx_types_and_errors():
    ints = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
    np.testing.assert_array_equal(read_idx(_idx_bytes(ints, 0x0C)), ints)
    floats = np.linspace(-1, 1, 6).astype(np.float32)
    np.testing.assert_array_equal(read_idx(_idx_bytes(floats, 0x0D)), floats)
    with pytest.raises(ValueError, match="magic"):
        read_idx(b"\x01\x00\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="truncated"):
        read_idx(_idx_bytes(np.zeros(4, np.uint8), 0x08)[:-1])


def test_mnist_test_set_loads(mnist):
    x, y = mnist
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # The published class counts of the MNIST test set.
    counts = torch.bincount(y).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_loader_accepts_plain_gz_arrays_and_dataset_objects(tmp_path, mnist):
    x, y = mnist
    images = (x[:50, 0] * 255).round().to(torch.uint8).numpy()
    labels = y[:50].numpy().astype(np.uint8)
    plain, gz = tmp_path / "plain", tmp_path / "gz"
    plain.mkdir()
    gz.mkdir()
    (plain / "train-images-idx3-ubyte").write_bytes(_idx_bytes(images, 0x08))
    (plain / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels, 0x08))
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        with open(plain / name, "rb") as src, gzip.open(gz / f"{name}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    zipped = tmp_path / "zip" / "MNIST" / "raw"
    zipped.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        with zipfile.ZipFile(zipped / f"{name}.zip", "w") as archive:
            archive.write(plain / name, arcname=name)
    loaded = [
        load_mnist(plain, "train"),
        load_mnist(gz, "train"),
        load_mnist(tmp_path / "zip" / "MNIST", "train"),  # torchvision's root/raw layout
        load_images((images, labels)),
        load_images(SimpleNamespace(data=torch.as_tensor(images), targets=torch.as_tensor(labels))),
    ]
    for xs, ys in loaded:
        assert torch.equal(xs, x[:50]) and torch.equal(ys, y[:50])
    with pytest.raises(FileNotFoundError, match="t10k images"):
        load_mnist(plain)


def _all_indices(split):
    parts = [split.test_index]
    for c in split.clients + split.new_clients:
        parts += [c.train_index, c.test_index]
    return torch.cat(parts)


@pytest.mark.parametrize(
    "scheme, kwargs",
    [
        ("dirichlet", {"alpha": 0.1}),
        ("dirichlet", {"alpha": 0.5}),
        ("dirichlet", {"alpha": 0.5, "dirichlet": "class"}),
        ("shards", {}),
        ("iid", {}),
    ],
)
def test_partition_sizes_disjoint_and_label_mix(mnist, scheme, kwargs):
    x, y = mnist
    split = partition(x, y, scheme=scheme, num_clients=100, num_new_clients=20, seed=3, **kwargs)
    assert len(split.clients) == 100 and len(split.new_clients) == 20
    # Balanced global test set: 200 images per class.
    assert torch.bincount(split.y_test).tolist() == [200] * 10
    # Disjoint, and together the whole set (shards drop the remainder of 8000 / 240).
    every = _all_indices(split)
    assert len(every) == len(torch.unique(every)) == (9920 if scheme == "shards" else 10000)
    for c in split.clients + split.new_clients:
        assert torch.equal(c.y_train, y[c.train_index]) and torch.equal(c.y_test, y[c.test_index])
        assert torch.equal(c.x_train, x[c.train_index])  # no rotation
        n = c.num_train + c.num_test
        assert c.num_test == round(0.2 * n)
        # Same label mix: each class's test count is within 1 of its 20% share.
        both = torch.bincount(torch.cat([c.y_train, c.y_test]), minlength=10).double()
        test = torch.bincount(c.y_test, minlength=10).double()
        assert bool(((test - 0.2 * both).abs() < 1).all())
        assert n >= 10
    sizes = [c.num_train + c.num_test for c in split.clients + split.new_clients]
    classes = [len(torch.unique(torch.cat([c.y_train, c.y_test]))) for c in split.clients]
    if scheme == "shards":
        # A shard spanning a class boundary holds two classes, so 2 shards hold 2 to 4.
        assert set(sizes) == {8000 // 240 * 2} and max(classes) <= 4
        assert float(np.median(classes)) <= 2
    if scheme == "iid" or kwargs.get("dirichlet", "client") == "client":
        assert max(sizes) - min(sizes) <= 1
    if scheme == "iid":
        assert min(classes) >= 8
    if scheme == "dirichlet":
        # Label skew: with alpha = 0.1 a typical client is dominated by one or two classes.
        top = [
            float(torch.bincount(torch.cat([c.y_train, c.y_test])).max()) / n
            for c, n in zip(split.clients, sizes)
        ]
        median_top = float(np.median(top))
        assert median_top > (0.6 if kwargs["alpha"] == 0.1 else 0.3)


def test_partition_is_deterministic_and_seed_dependent(mnist):
    x, y = mnist
    a = partition(x, y, num_clients=20, num_new_clients=5, alpha=0.5, seed=11)
    b = partition(x, y, num_clients=20, num_new_clients=5, alpha=0.5, seed=11)
    c = partition(x, y, num_clients=20, num_new_clients=5, alpha=0.5, seed=12)
    assert torch.equal(a.test_index, b.test_index)
    for ca, cb in zip(a.clients + a.new_clients, b.clients + b.new_clients):
        assert torch.equal(ca.train_index, cb.train_index)
        assert torch.equal(ca.test_index, cb.test_index)
    assert not torch.equal(a.clients[0].train_index, c.clients[0].train_index)


@pytest.mark.slow
def test_rotated_clusters(mnist):
    x, y = mnist
    split = partition(x, y, scheme="iid", num_clients=40, num_new_clients=8, rotations=4, seed=0)
    groups = [c.group for c in split.clients + split.new_clients]
    assert sorted(groups) == sorted([0, 1, 2, 3] * 12)  # balanced over all 48 clients
    for c in split.clients + split.new_clients:
        expect = torch.rot90(x[c.train_index], k=c.group, dims=(-2, -1))
        assert torch.equal(c.x_train, expect)
        assert torch.equal(c.x_test, torch.rot90(x[c.test_index], k=c.group, dims=(-2, -1)))
    # Global test: every (class, rotation) pair 50 times, images rotated accordingly.
    pairs = split.y_test * 4 + split.test_groups
    assert torch.bincount(pairs).tolist() == [50] * 40
    for g in range(4):
        rows = split.test_groups == g
        expect = torch.rot90(x[split.test_index[rows]], k=g, dims=(-2, -1))
        assert torch.equal(split.x_test[rows], expect)


def test_partition_errors(mnist):
    x, y = mnist
    with pytest.raises(ValueError, match="scheme"):
        partition(x, y, scheme="bogus")
    with pytest.raises(ValueError, match="rotations"):
        partition(x, y, rotations=5)
    with pytest.raises(ValueError, match="dirichlet"):
        partition(x, y, dirichlet="bogus")
    with pytest.raises(ValueError, match="per-class Dirichlet"):
        partition(x[:300], y[:300], dirichlet="class", num_clients=50, global_test=10)
