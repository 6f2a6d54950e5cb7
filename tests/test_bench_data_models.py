"""Benchmark data loaders (on tiny files in the real formats) and torch <-> flax model agreement."""
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is run from the repository
from benchmarks import data  # noqa: E402


def _write_cifar(tmp_path, n_per_batch=6, batches=(1, 2)):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    planes = {}
    for name in [f"data_batch_{i}" for i in batches] + ["test_batch"]:
        x = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        y = list(rng.integers(0, 10, size=n_per_batch))
        with open(root / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"data": x, b"labels": y,
                         b"filenames": [b"f.png"] * n_per_batch}, fh)
        planes[name] = (x, y)
    return tmp_path, planes


def test_cifar10_pickle_loader(tmp_path):
    parent, planes = _write_cifar(tmp_path)
    for d in (str(parent), str(parent / "cifar-10-batches-py")):
        ds = data.load_images("cifar10", d)
        assert ds.x_train.shape == (12, 32, 32, 3) and ds.x_test.shape == (6, 32, 32, 3)
        assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
        assert ds.y_train.tolist() == [int(v) for v in planes["data_batch_1"][1] + planes["data_batch_2"][1]]
    # channel-major planes -> NHWC: pixel (row 0, col 1) of image 0 has R at [1], G at [1025], B at [2049]
    raw = planes["data_batch_1"][0][0]
    rgb = np.array([raw[1], raw[1025], raw[2049]], dtype=np.float64) / 255.0
    mean, std = (np.array(ds.meta["norm"][k]) for k in ("mean", "std"))
    np.testing.assert_allclose(ds.x_train[0, 0, 1], (rgb - mean) / std, rtol=1e-5, atol=1e-5)
    # normalised per channel on the training split
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    with pytest.raises(FileNotFoundError):
        data.load_images("cifar10", str(tmp_path / "nope"))


@pytest.mark.parametrize("bad", ["not a pickle", "truncated", "no data", "a list", "labels short", "label 10",
                                 "data None", "string labels", "float labels", "pixel 300", "frame overflow",
                                 "no images", "no images, list labels"])
def test_cifar10_malformed_batch_is_a_value_error_naming_the_file(tmp_path, bad):
    """A batch file that is not CIFAR-10's (before: raw UnpicklingError/KeyError/TypeError tracebacks from the
    command line, and a label count that did not match passed the check and failed every run; a batch of no
    images passed it too, and every run failed, dividing by zero)."""
    parent, planes = _write_cifar(tmp_path)
    path = parent / "cifar-10-batches-py" / "data_batch_2"
    x, y = planes["data_batch_2"]
    content = {"not a pickle": b"hello", "truncated": pickle.dumps({b"data": x, b"labels": y})[:40],
               "no data": pickle.dumps({b"labels": y}), "a list": pickle.dumps([1, 2]),
               "labels short": pickle.dumps({b"data": x, b"labels": y[:-1]}),
               "label 10": pickle.dumps({b"data": x, b"labels": [10] * len(y)}),
               "data None": pickle.dumps({b"data": None, b"labels": y}),
               "string labels": pickle.dumps({b"data": x, b"labels": ["cat"] * len(y)}),
               "float labels": pickle.dumps({b"data": x, b"labels": [1.7] * len(y)}),
               "pixel 300": pickle.dumps({b"data": x.astype(np.int64) + 300, b"labels": y}),
               # junk whose unpickling raises OverflowError (was a traceback from the command line, exit 1)
               "frame overflow": b"\x95\xe2\xbeFP?=\xc3\xcd\xefG\x99\xb5\xf2\xd4o\xf4\xfa",
               "no images": pickle.dumps({b"data": x[:0], b"labels": np.asarray(y, dtype=np.int64)[:0]}),
               "no images, list labels": pickle.dumps({b"data": x[:0], b"labels": []})}[bad]
    path.write_bytes(content)
    with pytest.raises(ValueError, match="data_batch_2" + (": a CIFAR-10 batch with no images" if "no images" in bad
                                                           else "")):
        data.load_images("cifar10", str(parent))


def test_text_too_short_says_which_part(tmp_path):
    """A 100-byte text: its held-out 10 % cannot hold a block of 17 bytes. The message gives the file's size and
    both parts' (before: "text of 10 bytes", the held-out part's size alone, as if it were the file's)."""
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 10)
    with pytest.raises(ValueError, match=r"text of 100 bytes is too short: its training part \(90 bytes\) and its "
                                         r"held-out last 10% \(10 bytes\)"):
        data.load_text(str(path), block_len=16)
    assert len(data.load_text(str(path), block_len=8).x_test) == 1


def test_digits_default():
    ds = data.load_images()
    assert ds.name == "digits" and ds.input_shape == (8, 8, 1) and ds.num_classes == 10
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert abs(float(ds.x_train.mean())) < 1e-4


def test_text_loaders(tmp_path, monkeypatch):
    p = tmp_path / "tiny.txt"
    text = "First Citizen:\nBefore we proceed any further, hear me speak. é\n" * 4
    p.write_text(text, encoding="utf-8")
    raw = data.load_text_bytes(str(p))
    assert raw == text.encode("utf-8")
    x, y = data.lm_blocks(raw, 16)
    assert x.shape == y.shape and x.shape[1] == 16 and x.shape[0] == (len(raw) - 1) // 16
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(x[1, 0], raw[16])
    ds = data.load_text(str(p), block_len=8)
    assert ds.kind == "text" and ds.num_classes == 256 and ds.x_train.max() < 256
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(UnicodeDecodeError):
        data.load_text_bytes(str(bad))
    pydoc = data.load_text_bytes()
    assert len(pydoc) > 300_000 and b"assert" in pydoc
    (tmp_path / "pydoc").write_bytes(raw)  # --text pydoc: a file of that name is the file (it was the bundled text)
    monkeypatch.chdir(tmp_path)
    assert data.load_text_bytes("pydoc") == raw
    assert len(data.load_text("pydoc", block_len=8).x_train) < 30


def test_regimes():
    x = np.arange(100)[:, None].astype(np.float32)
    y = np.arange(100)
    xs, ys = data.full_batch_subset(x, y, 10, seed=3)
    assert len(xs) == 10 and np.array_equal(xs[:, 0], ys)
    assert np.array_equal(data.full_batch_subset(x, y, 10, seed=3)[1], ys)
    it1, it2 = data.minibatches(x, y, 32, seed=1), data.minibatches(x, y, 32, seed=1)
    seen = []
    for _ in range(3):  # one epoch (drop_last): 96 distinct examples
        a, b = next(it1), next(it2)
        assert np.array_equal(a[1], b[1]) and len(a[1]) == 32
        seen += a[1].tolist()
    assert len(set(seen)) == 96
    first = [b[1].tolist() for b in data.torch_loader(x, y, 32, seed=1)]
    assert [len(b) for b in first] == [32, 32, 32]
    assert [b[1].tolist() for b in data.torch_loader(x, y, 32, seed=1)] == first


CASES = [
    ("mlp", (8, 8, 1), 10, {}),
    ("resnet", (8, 8, 1), 10, {"depth": 2, "norm": "groupnorm"}),
    ("resnet", (8, 8, 1), 10, {"norm": "layernorm"}),
    ("resnet", (8, 8, 1), 10, {"norm": "batchnorm"}),
    ("vit", (8, 8, 1), 10, {}),
    ("vit", (8, 8, 1), 10, {"attn_scale": "mup", "depth": 1}),
    ("lm", (12,), 256, {}),
]


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
@pytest.mark.parametrize("name,shape,nc,kw", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_torch_flax_agree_float64(name, shape, nc, kw):
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from benchmarks import models_flax as mf
    from benchmarks import models_torch as mt

    rng = np.random.default_rng(0)
    x = rng.integers(0, nc, size=(3, *shape)) if name == "lm" else rng.normal(size=(3, *shape))
    with jax.enable_x64(True):
        tm = mt.build_model(name, shape, nc, 8, seed=1, **kw).double()
        fm = mf.build_model(name, shape, nc, 8, **kw)
        v = mf.torch_to_flax(tm)
        ref = jax.eval_shape(lambda: mf.init_variables(fm, shape, is_text=name == "lm"))
        same = jax.tree_util.tree_map(lambda a: a.shape, v) == jax.tree_util.tree_map(lambda a: a.shape, ref)
        assert same, "parameter tree of the copied torch weights differs from flax's own"
        for train in (False, True):
            tm.train(train)
            xt = torch.from_numpy(x) if name == "lm" else torch.from_numpy(x).double()
            yt = tm(xt).detach().numpy()
            xf = jnp.asarray(x)
            if train and "batch_stats" in v:
                yf, _ = fm.apply(v, xf, train=True, mutable=["batch_stats"])
            else:
                yf = fm.apply(v, xf, train=train)
            assert yf.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(yf), yt, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_same_init_distribution():
    """Flax's own initialisers draw from the same distributions as the torch init (std per tensor)."""
    import jax

    from benchmarks import models_flax as mf
    from benchmarks import models_torch as mt

    tm = mt.build_model("vit", (8, 8, 1), 10, 32, seed=0, depth=1)
    a = jax.tree_util.tree_leaves(mf.torch_to_flax(tm))
    fm = mf.build_model("vit", (8, 8, 1), 10, 32, depth=1)
    b = jax.tree_util.tree_leaves(jax.jit(lambda: mf.init_variables(fm, (8, 8, 1)))())
    assert [u.shape for u in a] == [w.shape for w in b]
    compared = 0
    for u, w in zip(a, b):
        if u.size >= 256:
            assert abs(float(np.std(u)) - float(np.std(w))) < 0.25 * float(np.std(u)) + 1e-3
            compared += 1
    assert compared >= 4
