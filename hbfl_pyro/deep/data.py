"""Image data for federated deep learning: an IDX (MNIST) reader and client partitioners.

Everything here is deterministic given its ``seed`` (numpy's PCG64 generator, the same on
every platform). :func:`partition` turns one labelled image set into a federation
(evaluation.md §B):

- a **balanced global test set** (the same number of images of every class, taken first);
- ``num_clients`` training clients and ``num_new_clients`` held-out "new" clients, all
  drawn from the remaining images by one of the schemes ``"dirichlet"`` (label skew:
  each client's label mix ``~ Dirichlet(alpha)``, or each class shared out over clients
  by ``Dirichlet(alpha)`` proportions),
  ``"shards"`` (the pathological split: the pool sorted by label is cut into equal shards
  and each client gets ``shards_per_client`` of them) or ``"iid"``;
- optionally ``rotations`` client groups whose images are rotated by ``90 k`` degrees
  (``k = 0..rotations-1``; 4 groups are the clustered setting of the mixture model); the
  global test set then holds every rotation equally often in every class;
- each client's images split into train and test with the **same label mix** (per class,
  a largest-remainder split of its count).

No image is in two places: the global test set, the clients' train and test splits are
disjoint (tested).

Example::

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> images = rng.integers(0, 256, size=(600, 28, 28), dtype=np.uint8)
    >>> labels = np.arange(600) % 10
    >>> x, y = load_images((images, labels))
    >>> split = partition(x, y, num_clients=8, num_new_clients=2, global_test=100, seed=0)
    >>> len(split.clients), len(split.new_clients), tuple(split.x_test.shape)
    (8, 2, (100, 1, 28, 28))
    >>> sum(c.num_train + c.num_test for c in split.clients + split.new_clients)
    500
"""

from __future__ import annotations

import gzip
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np
import torch

__all__ = [
    "ClientSplit",
    "FederatedSplit",
    "load_images",
    "load_mnist",
    "partition",
    "read_idx",
]

# IDX type codes (http://yann.lecun.com/exdb/mnist/): all multi-byte values big-endian.
_IDX_DTYPES: Dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    """The raw IDX bytes of a plain, ``.gz`` or single-member ``.zip`` file."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if len(members) != 1:
                raise ValueError(f"{path}: expected one IDX file in the archive, found {members}")
            return archive.read(members[0])
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def read_idx(source: Union[str, os.PathLike, bytes]) -> np.ndarray:
    """Read one IDX array (the MNIST file format) from a path or from its bytes.

    The path may name a plain file, a ``.gz`` file or a ``.zip`` archive holding one file.

    :returns: a numpy array of the file's type and shape.

    Example::

        >>> import struct
        >>> raw = struct.pack(">BBBBII", 0, 0, 0x08, 2, 2, 3) + bytes(range(6))
        >>> read_idx(raw)
        array([[0, 1, 2],
               [3, 4, 5]], dtype=uint8)
    """
    raw = source if isinstance(source, bytes) else _read_bytes(Path(source))
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError("not an IDX file: bad magic number")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    count = int(np.prod(shape)) if shape else 1
    if len(raw) < offset + count * dtype.itemsize:
        raise ValueError(f"IDX file truncated: header says shape {shape}")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: Path, prefix: str, kind: str) -> Path:
    """The file of ``prefix`` (``t10k``/``train``) and ``kind`` (``images``/``labels``)."""
    candidates = sorted(
        p
        for p in directory.iterdir()
        if p.is_file()
        and p.name.startswith(prefix)
        and kind in p.name
        and ("idx" in p.name or "ubyte" in p.name)
    )
    if not candidates:
        raise FileNotFoundError(
            f"no {prefix} {kind} IDX file in {directory} (looked for {prefix}-{kind}-idx?-ubyte "
            "with optional .gz or .zip)"
        )
    # Prefer the uncompressed file, then .gz, then .zip, when several are present.
    rank = {"": 0, ".gz": 1, ".zip": 2}
    return min(candidates, key=lambda p: rank.get(p.suffix if p.suffix in rank else "", 0))


def load_mnist(
    directory: Union[str, os.PathLike], split: str = "t10k"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load an MNIST-format IDX pair (``<split>-images-idx3-ubyte``, ``<split>-labels-...``)
    from a directory; files may be plain, ``.gz`` or ``.zip``. torchvision's
    ``MNIST/raw`` folder is such a directory.

    :param split: the file prefix, ``"t10k"`` (test set) or ``"train"``.
    :returns: ``(images, labels)`` as from :func:`load_images`.
    """
    directory = Path(directory)
    if directory.is_dir() and (directory / "raw").is_dir() and not any(directory.glob(f"{split}*")):
        directory = directory / "raw"  # torchvision's root/MNIST layout
    images = read_idx(_find(directory, split, "images"))
    labels = read_idx(_find(directory, split, "labels"))
    return load_images((images, labels))


def load_images(source: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images and labels from what a user has: a directory of IDX files, a pair
    ``(images, labels)`` of arrays or tensors, or a dataset object with ``.data`` and
    ``.targets`` (e.g. ``torchvision.datasets.MNIST``).

    :returns: ``images`` as float32 of shape ``(n, channels, height, width)`` in ``[0, 1]``
        (integer pixels are divided by 255; ``(n, h, w)`` gets one channel), and ``labels``
        as int64 of shape ``(n,)``.
    """
    if isinstance(source, (str, os.PathLike)):
        return load_mnist(source)
    if hasattr(source, "data") and hasattr(source, "targets"):
        images, labels = source.data, source.targets
    else:
        images, labels = source
    images = torch.as_tensor(np.asarray(images))
    labels = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    integer = not images.is_floating_point()
    images = images.to(torch.float32)
    if integer:
        images = images / 255.0
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(f"images must have shape (n, h, w) or (n, c, h, w), got {images.shape}")
    return images, labels


# --------------------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------------------


@dataclass
class ClientSplit:
    """One client's data: a train and a test split with the same label mix.

    ``train_index`` and ``test_index`` point into the images given to :func:`partition`;
    ``group`` is the client's rotation group (its images are rotated by ``90 * group``
    degrees), 0 without rotations.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_index: torch.Tensor
    test_index: torch.Tensor
    group: int = 0

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.y_test.shape[0])


@dataclass
class FederatedSplit:
    """A federation built by :func:`partition`.

    :ivar clients: the training clients.
    :ivar new_clients: held-out clients, never seen in training.
    :ivar x_test: the balanced global test images; ``y_test`` their labels,
        ``test_index`` their indices into the input, ``test_groups`` their rotation groups.
    :ivar info: the settings that made the split (scheme, alpha, seed, ...).
    """

    clients: List[ClientSplit]
    new_clients: List[ClientSplit]
    x_test: torch.Tensor
    y_test: torch.Tensor
    test_index: torch.Tensor
    test_groups: torch.Tensor
    num_classes: int
    info: Dict[str, Any] = field(default_factory=dict)


def _balanced_test(
    labels: np.ndarray, size: int, classes: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """``size`` indices, the same number per class (the remainder to the first classes)."""
    per_class = np.full(len(classes), size // len(classes))
    per_class[: size % len(classes)] += 1
    chosen = []
    for c, k in zip(classes, per_class):
        pool = np.flatnonzero(labels == c)
        if k > len(pool):
            raise ValueError(f"class {c} has {len(pool)} images; the global test needs {k}")
        chosen.append(rng.permutation(pool)[:k])
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def _dirichlet_clients(
    pool: np.ndarray, labels: np.ndarray, num: int, alpha: float, rng: np.random.Generator
) -> List[np.ndarray]:
    """Label skew with equal client sizes: client ``i``'s label mix is ``q_i ~ Dir(alpha 1)``.

    Clients are filled in turn, each drawing its ``n_i`` labels from ``q_i`` without
    replacement; a class that runs out is dropped from ``q_i`` (renormalised), so late
    clients may be less skewed than their draw. Sizes differ by at most one image.
    """
    classes = np.unique(labels[pool])
    queues = [rng.permutation(pool[labels[pool] == c]) for c in classes]
    used = np.zeros(len(classes), dtype=np.int64)
    remaining = np.array([len(q) for q in queues], dtype=np.int64)
    sizes = np.full(num, len(pool) // num)
    sizes[: len(pool) % num] += 1
    out = []
    for size in sizes:
        mix = rng.dirichlet(np.full(len(classes), alpha))
        take = np.zeros(len(classes), dtype=np.int64)
        want = int(size)
        while want > 0:
            avail = remaining - take
            p = np.where(avail > 0, mix, 0.0)
            if p.sum() <= 0:  # all of q_i's mass on exhausted classes
                p = (avail > 0).astype(float)
            draw = np.minimum(rng.multinomial(want, p / p.sum()), avail)
            take += draw
            want -= int(draw.sum())
        out.append(np.concatenate([q[u : u + t] for q, u, t in zip(queues, used, take)]))
        used += take
        remaining -= take
    return out


def _dirichlet_classes(
    pool: np.ndarray,
    labels: np.ndarray,
    num: int,
    alpha: float,
    min_size: int,
    rng: np.random.Generator,
    max_tries: int = 200,
) -> List[np.ndarray]:
    """Label skew as in Hsu et al. (2019): the images of class ``c`` go to the clients by
    proportions ``p_c ~ Dir(alpha 1)``, so client sizes vary too.

    Redrawn (with the same generator, so still deterministic) until every client holds at
    least ``min_size`` images. With few images per client and small ``alpha`` this is
    often impossible (8,000 MNIST images, 120 clients, alpha = 0.1: the smallest client
    has 0 images in 95% of draws); then use ``dirichlet="client"``.
    """
    classes = np.unique(labels[pool])
    for _ in range(max_tries):
        parts: List[List[np.ndarray]] = [[] for _ in range(num)]
        for c in classes:
            members = rng.permutation(pool[labels[pool] == c])
            share = rng.dirichlet(np.full(num, alpha))
            cuts = (np.cumsum(share)[:-1] * len(members)).astype(np.int64)
            for i, piece in enumerate(np.split(members, cuts)):
                parts[i].append(piece)
        out = [np.concatenate(p) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(
        f"no per-class Dirichlet(alpha={alpha}) split gave every one of {num} clients "
        f"{min_size} images in {max_tries} tries; use dirichlet='client' (equal sizes), "
        "lower min_size or the number of clients, or raise alpha"
    )


def _shards(
    pool: np.ndarray, labels: np.ndarray, num: int, per_client: int, rng: np.random.Generator
) -> List[np.ndarray]:
    """The pathological split: sort by label, cut into ``num * per_client`` equal shards."""
    shuffled = rng.permutation(pool)
    ordered = shuffled[np.argsort(labels[shuffled], kind="stable")]
    num_shards = num * per_client
    size = len(ordered) // num_shards
    if size == 0:
        raise ValueError(f"{len(pool)} images cannot make {num_shards} shards")
    shards = ordered[: size * num_shards].reshape(num_shards, size)
    order = rng.permutation(num_shards).reshape(num, per_client)
    return [shards[row].reshape(-1) for row in order]


def _stratified(
    index: np.ndarray, labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> Tuple[np.ndarray, np.ndarray]:
    """Split one client's images so that train and test have the same label mix.

    Class ``c`` with ``n_c`` images puts ``floor(q_c)`` or ``ceil(q_c)`` of them in the
    test split, ``q_c = test_fraction n_c``; the ceilings go to the largest remainders
    (ties at random) so the test split holds ``round(test_fraction n)`` images in all.
    """
    classes, counts = np.unique(labels[index], return_counts=True)
    quota = test_fraction * counts
    take = np.floor(quota).astype(np.int64)
    extra = int(round(test_fraction * len(index))) - int(take.sum())
    if extra > 0:
        remainder = quota - take + rng.random(len(classes)) * 1e-9  # random tie-break
        take[np.argsort(-remainder)[:extra]] += 1
    train, test = [], []
    for c, k in zip(classes, take):
        members = rng.permutation(index[labels[index] == c])
        test.append(members[:k])
        train.append(members[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _rotate(images: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Rotate each image by ``90 * group`` degrees (exact: a permutation of pixels)."""
    out = images.clone()
    for k in groups.unique().tolist():
        if k % 4:
            rows = groups == k
            out[rows] = torch.rot90(images[rows], k=int(k), dims=(-2, -1))
    return out


def partition(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    scheme: str = "dirichlet",
    num_clients: int = 100,
    num_new_clients: int = 20,
    alpha: float = 0.5,
    dirichlet: str = "client",
    shards_per_client: int = 2,
    rotations: int = 1,
    global_test: int = 2000,
    test_fraction: float = 0.2,
    min_size: int = 10,
    seed: int = 0,
) -> FederatedSplit:
    """Split a labelled image set into a federation (see the module docstring).

    :param images: ``(n, c, h, w)`` (e.g. from :func:`load_images`).
    :param labels: ``(n,)`` integer classes.
    :param scheme: ``"dirichlet"``, ``"shards"`` or ``"iid"``.
    :param num_clients: training clients.
    :param num_new_clients: held-out clients (chosen at random among all partitioned).
    :param alpha: Dirichlet concentration (smaller = more skewed).
    :param dirichlet: ``"client"`` (each client's label mix ``~ Dir(alpha)``, equal client
        sizes; the default, feasible at any alpha) or ``"class"`` (each class shared out
        over clients by ``Dir(alpha)``, Hsu et al. 2019; client sizes vary).
    :param shards_per_client: shards per client for ``"shards"``.
    :param rotations: number of rotation groups (1 = none, at most 4); client ``i``'s
        group is balanced over clients, its images rotated by ``90 * group`` degrees.
    :param global_test: size of the balanced global test set, taken before partitioning.
    :param test_fraction: each client's test share.
    :param min_size: fewest images per client (``dirichlet="class"`` redraws until it holds).
    :param seed: the only source of randomness.
    """
    if scheme not in ("dirichlet", "shards", "iid"):
        raise ValueError(f"scheme must be 'dirichlet', 'shards' or 'iid', got {scheme!r}")
    if dirichlet not in ("client", "class"):
        raise ValueError(f"dirichlet must be 'client' or 'class', got {dirichlet!r}")
    if not 1 <= rotations <= 4:
        raise ValueError(f"rotations must be 1 to 4, got {rotations}")
    labels_np = labels.cpu().numpy().astype(np.int64)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels_np)
    test_index = _balanced_test(labels_np, global_test, classes, rng)
    in_test = np.zeros(len(labels_np), dtype=bool)
    in_test[test_index] = True
    pool = np.flatnonzero(~in_test)
    total = num_clients + num_new_clients
    if scheme == "dirichlet" and dirichlet == "client":
        parts = _dirichlet_clients(pool, labels_np, total, alpha, rng)
    elif scheme == "dirichlet":
        parts = _dirichlet_classes(pool, labels_np, total, alpha, min_size, rng)
    elif scheme == "shards":
        parts = _shards(pool, labels_np, total, shards_per_client, rng)
    else:
        parts = np.array_split(rng.permutation(pool), total)
    # Which partitioned clients are held out, and each client's rotation group.
    order = rng.permutation(total)
    group_of = np.empty(total, dtype=np.int64)
    group_of[order] = np.arange(total) % rotations
    held_out = set(order[num_clients:].tolist())
    train_clients: List[ClientSplit] = []
    new_clients: List[ClientSplit] = []
    for i, part in enumerate(parts):
        train_idx, test_idx = _stratified(part, labels_np, test_fraction, rng)
        g = int(group_of[i])
        train_t, test_t = torch.as_tensor(train_idx), torch.as_tensor(test_idx)

        def rotated(idx, g=g):
            return _rotate(images[idx], torch.full((len(idx),), g))

        client = ClientSplit(
            x_train=rotated(train_t),
            y_train=labels[train_t].long(),
            x_test=rotated(test_t),
            y_test=labels[test_t].long(),
            train_index=train_t,
            test_index=test_t,
            group=g,
        )
        (new_clients if i in held_out else train_clients).append(client)
    # Every class and rotation equally often in the global test set.
    test_groups = np.zeros(len(test_index), dtype=np.int64)
    for c in classes:
        rows = np.flatnonzero(labels_np[test_index] == c)
        test_groups[rows] = np.arange(len(rows)) % rotations
    test_t = torch.as_tensor(test_index)
    groups_t = torch.as_tensor(test_groups)
    info = {
        "scheme": scheme,
        "num_clients": num_clients,
        "num_new_clients": num_new_clients,
        "alpha": alpha if scheme == "dirichlet" else None,
        "dirichlet": dirichlet if scheme == "dirichlet" else None,
        "shards_per_client": shards_per_client if scheme == "shards" else None,
        "rotations": rotations,
        "global_test": global_test,
        "test_fraction": test_fraction,
        "seed": seed,
    }
    return FederatedSplit(
        clients=train_clients,
        new_clients=new_clients,
        x_test=_rotate(images[test_t], groups_t),
        y_test=labels[test_t].long(),
        test_index=test_t,
        test_groups=groups_t,
        num_classes=int(labels_np.max()) + 1 if len(labels_np) else 0,
        info=info,
    )
