"""Benchmark data, with no downloads.

Everything here returns NumPy arrays so that the PyTorch and the JAX runs share the exact same numbers:

* images are ``float32`` arrays in NHWC layout (``N x H x W x C``), normalised per channel with the
  training split's mean and standard deviation; labels are ``int64``;
* text is a ``bytes`` stream cut into byte-level language-modelling blocks: ``x`` the block, ``y`` the
  same block shifted by one byte (both ``int64``, vocabulary 256).

Sources:

* ``digits`` (default images): scikit-learn's bundled handwritten digits, 1,797 real 8x8x1 images, 10
  classes. A fixed permutation (seed 0) holds out 20% as the test split.
* ``cifar10``: real CIFAR-10 from a local directory in its standard python-pickle format
  (``data_batch_1`` .. ``data_batch_5`` and ``test_batch``, each a pickled dict with ``b'data'`` a
  uint8 ``N x 3072`` array, channel-major R, G, B planes of 32x32, and ``b'labels'``). Missing
  ``data_batch_k`` files are tolerated (at least one must exist), so a partial copy works.
* ``pydoc`` (default text): CPython's own documentation topics (``pydoc_data.topics``), the values of
  the ``topics`` dict joined in key order with a newline, UTF-8 encoded (~0.46 MB of English prose).
  Any local UTF-8 text file (Tiny Shakespeare, WikiText, ...) by path instead.

Regimes: :func:`full_batch_subset` picks a fixed-size subset (every step trains on all of it);
:func:`minibatches` (NumPy) and :func:`torch_loader` (``torch.utils.data.DataLoader``) give shuffled
batches, each reproducible from its seed (the two orders differ: within a backend every run of a seed sees the
same batches, across backends not), and the held-out split serves evaluation.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

__all__ = [
    "Dataset",
    "load_digits",
    "load_cifar10",
    "load_images",
    "load_text_bytes",
    "lm_blocks",
    "load_text",
    "load_dataset",
    "full_batch_subset",
    "minibatches",
    "torch_loader",
    "CIFAR10_TRAIN_FILES",
    "cifar10_files",
]

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"


@dataclass
class Dataset:
    """A train/test split as NumPy arrays.

    ``kind`` is ``"image"`` (``x`` float32 NHWC, ``y`` int64 class) or ``"text"`` (``x``, ``y`` int64
    ``N x block_len`` byte ids, ``y`` shifted by one). ``num_classes`` is the number of classes or the
    vocabulary size (256 for bytes).
    """

    name: str
    kind: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    meta: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:  # short, no array dumps
        return (f"Dataset({self.name!r}, {self.kind}, train={self.x_train.shape}, test={self.x_test.shape}, "
                f"classes={self.num_classes})")


def _normalise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    axes = (0, 1, 2)
    mean = x_train.mean(axis=axes, keepdims=True)
    std = x_train.std(axis=axes, keepdims=True) + 1e-8
    stats = {"mean": mean.ravel().tolist(), "std": std.ravel().tolist()}
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32), stats


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits as NHWC ``(N, 8, 8, 1)`` float32, normalised; fixed split."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = d.images.astype(np.float64)[..., None]  # (1797, 8, 8, 1), values 0..16
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    x_tr, x_te, stats = _normalise(x[train], x[test])
    return Dataset("digits", "image", x_tr, y[train], x_te, y[test], 10, {"norm": stats})


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file: images (N x 32 x 32 x 3, uint8) and labels. A file that is not such a batch
    (not a pickle, truncated, no ``data``/``labels``, no images, other shapes, labels outside 0-9 or not one per
    image) raises ``ValueError`` naming the file."""
    try:
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
    except Exception as err:  # noqa: BLE001 -- unpickling other bytes raises almost anything (OverflowError, ...)
        raise ValueError(f"{path}: not a CIFAR-10 python-pickle batch ({type(err).__name__}: {err})") from err
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a CIFAR-10 batch (a pickled {type(d).__name__}, expected a dict)")
    try:
        data = d[b"data"] if b"data" in d else d["data"]
        labels = d[b"labels"] if b"labels" in d else d["labels"]
    except KeyError as err:
        raise ValueError(f"{path}: not a CIFAR-10 batch (no {err} entry)") from None
    data, labels = np.asarray(data), np.asarray(labels)
    if not data.size:
        raise ValueError(f"{path}: a CIFAR-10 batch with no images (b'data' of shape {data.shape})")
    if data.dtype.kind not in "iu" or data.ndim != 2 or data.shape[1] != 3072 or (
            data.min() < 0 or data.max() > 255):
        raise ValueError(f"{path}: expected b'data' of N x 3072 pixel values 0-255, got {data.dtype} of shape "
                         f"{data.shape}")
    data = data.astype(np.uint8)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: expected integer labels, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.shape != (data.shape[0],) or labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: expected one label in 0-9 per image ({data.shape[0]} images), got labels of "
                         f"shape {labels.shape}" + (f" in {labels.min()}..{labels.max()}" if labels.size else ""))
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-major planes -> NHWC
    return x, labels


def cifar10_files(data_dir: str) -> tuple[str | None, list[str]]:
    """``(root, training batch files)`` of a CIFAR-10 copy: ``root`` is ``data_dir`` or its
    ``cifar-10-batches-py``, whichever holds the test batch (None: neither), and the files of
    ``data_batch_1..5`` present there."""
    cand = [data_dir, os.path.join(data_dir, "cifar-10-batches-py")]
    root = next((c for c in cand if os.path.exists(os.path.join(c, CIFAR10_TEST_FILE))), None)
    if root is None:
        return None, []
    return root, [os.path.join(root, f) for f in CIFAR10_TRAIN_FILES if os.path.exists(os.path.join(root, f))]


def load_cifar10(data_dir: str) -> Dataset:
    """Real CIFAR-10 from ``data_dir`` in the standard python-pickle format (see module docstring).

    ``data_dir`` may be the folder holding the batch files or its parent containing
    ``cifar-10-batches-py``. Pixels are scaled to [0, 1] then normalised per channel.
    """
    if data_dir is None:
        raise FileNotFoundError("CIFAR-10 needs --data-dir pointing at the cifar-10-batches-py folder")
    root, train = cifar10_files(data_dir)
    if root is None:
        raise FileNotFoundError(
            f"no CIFAR-10 python-pickle files in {data_dir!r} (expected data_batch_1..5 and test_batch)")
    if not train:
        raise FileNotFoundError(f"no data_batch_* files in {root!r}")
    parts = [_read_cifar_batch(f) for f in train]
    x_tr = np.concatenate([p[0] for p in parts]).astype(np.float64) / 255.0
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_cifar_batch(os.path.join(root, CIFAR10_TEST_FILE))
    x_tr, x_te, stats = _normalise(x_tr, x_te.astype(np.float64) / 255.0)
    return Dataset("cifar10", "image", x_tr, y_tr, x_te, y_te, 10, {"norm": stats, "root": root})


def load_images(name: str = "digits", data_dir: str | None = None) -> Dataset:
    """``"digits"`` (bundled) or ``"cifar10"`` (from ``data_dir``)."""
    if name == "digits":
        return load_digits()
    if name == "cifar10":
        return load_cifar10(data_dir)
    raise ValueError(f"unknown image dataset {name!r}; expected 'digits' or 'cifar10'")


def load_text_bytes(path: str | None = None) -> bytes:
    """The UTF-8 bytes of a local text file, or of ``pydoc_data.topics`` when ``path`` is None (a file named
    ``pydoc`` is a file)."""
    if path is None:
        from pydoc_data.topics import topics

        return "\n".join(topics[k] for k in topics).encode("utf-8")
    with open(path, "rb") as fh:
        raw = fh.read()
    raw.decode("utf-8")  # validate: raises UnicodeDecodeError on a non-UTF-8 file
    return raw


def lm_blocks(data: bytes, block_len: int, max_blocks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cut a byte stream into non-overlapping blocks of ``block_len + 1`` bytes: ``x = b[:-1]``, ``y = b[1:]``."""
    if block_len < 1:
        raise ValueError(f"block_len must be >= 1, got {block_len}")
    arr = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    n = (len(arr) - 1) // block_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n < 1:
        raise ValueError(f"text of {len(arr)} bytes is too short for one block of {block_len + 1}")
    idx = np.arange(n)[:, None] * block_len + np.arange(block_len + 1)[None, :]
    blocks = arr[idx]
    return blocks[:, :-1].copy(), blocks[:, 1:].copy()


def load_text(path: str | None = None, block_len: int = 64, test_fraction: float = 0.1) -> Dataset:
    """Byte-level LM blocks; the last ``test_fraction`` of the stream is the held-out split."""
    raw = load_text_bytes(path)
    cut = int(len(raw) * (1.0 - test_fraction))
    if min(cut, len(raw) - cut) < block_len + 1:
        raise ValueError(f"text of {len(raw)} bytes is too short: its training part ({cut} bytes) and its held-out "
                         f"last {test_fraction:.0%} ({len(raw) - cut} bytes) must each hold a block of "
                         f"{block_len + 1} bytes")
    x_tr, y_tr = lm_blocks(raw[:cut], block_len)
    x_te, y_te = lm_blocks(raw[cut:], block_len)
    name = "pydoc" if path is None else os.path.basename(path)
    return Dataset(name, "text", x_tr, y_tr, x_te, y_te, 256, {"bytes": len(raw), "block_len": block_len})


def load_dataset(kind: str, *, data_dir: str | None = None, image_set: str | None = None,
                 text_path: str | None = None, block_len: int = 64) -> Dataset:
    """Dataset for a task kind: ``"image"`` (CIFAR-10 when ``image_set == "cifar10"``, else digits) or ``"text"``."""
    if kind == "image":
        return load_images(image_set or "digits", data_dir)
    if kind == "text":
        return load_text(text_path, block_len)
    raise ValueError(f"unknown data kind {kind!r}")


def full_batch_subset(x: np.ndarray, y: np.ndarray, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed subset of ``size`` examples (seeded permutation; all of them if ``size >= len(x)``)."""
    n = len(x)
    if size >= n:
        return x, y
    idx = np.sort(np.random.default_rng(seed).permutation(n)[:size])
    return x[idx], y[idx]


def minibatches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0,
                drop_last: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless shuffled mini-batches: a fresh seeded permutation each epoch (reproducible)."""
    n = len(x)
    if batch_size > n:
        batch_size = n
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        stop = n - (n % batch_size) if drop_last else n
        for i in range(0, stop, batch_size):
            j = perm[i:i + batch_size]
            yield x[j], y[j]


def torch_loader(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0, drop_last: bool = True):
    """``torch.utils.data.DataLoader`` over the arrays, shuffled with a seeded generator."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator()
    g.manual_seed(seed)
    ds = TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))
    return DataLoader(ds, batch_size=min(batch_size, len(x)), shuffle=True, generator=g, drop_last=drop_last)
