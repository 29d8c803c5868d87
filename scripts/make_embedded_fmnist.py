"""Build scorelab/assets/fmnist_subset.npz, the Fashion-MNIST subset shipped with scorelab.

Selection (no randomness): the first ``--per-class-train`` images of each class in the official
training file, in file order, and the first ``--per-class-test`` of each class in the test file.
The four source files are checked against ``scorelab.data.images.FMNIST_FILES`` first.

Arrays written (deflate-compressed zip, fixed timestamps, so the output is byte-reproducible):
    images (N, 28, 28) uint8, labels (N,) uint8, index (N,) uint16 position in the source file,
    test_images, test_labels, test_index likewise for the test split.

Usage:
    python scripts/make_embedded_fmnist.py [--src /usr/share/datasets/fashion-mnist] [--out PATH]
The source files come from Debian's ``dataset-fashion-mnist`` package (``apt-get install
dataset-fashion-mnist``) or from ``scorelab.data.images.download_fashion_mnist(DIR)``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

from scorelab.data.images import DEBIAN_FMNIST_DIR, FMNIST_FILES, read_idx, verify_file

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "scorelab" / "assets" / "fmnist_subset.npz"


def first_per_class(labels: np.ndarray, per_class: int, num_classes: int = 10) -> np.ndarray:
    """Indices of the first ``per_class`` examples of each class, in increasing order."""
    idx = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(num_classes)])
    counts = np.bincount(labels[idx], minlength=num_classes)
    if (counts != per_class).any():
        raise SystemExit(f"not enough examples per class: {counts.tolist()}")
    return np.sort(idx)


def load_split(src: Path, prefix: str, per_class: int):
    img_name, lab_name = f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"
    for name in (img_name, lab_name):
        verify_file(src / name, FMNIST_FILES[name])
    images, labels = read_idx(src / img_name), read_idx(src / lab_name)
    idx = first_per_class(labels, per_class)
    return images[idx], labels[idx].astype(np.uint8), idx.astype(np.uint16)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with fixed zip timestamps (byte-identical output for identical input)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for key, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, buf.getvalue(), compresslevel=9)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=DEBIAN_FMNIST_DIR, help="directory with the four .gz idx files")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--per-class-train", type=int, default=600)
    ap.add_argument("--per-class-test", type=int, default=100)
    args = ap.parse_args(argv)

    tr_x, tr_y, tr_i = load_split(args.src, "train", args.per_class_train)
    te_x, te_y, te_i = load_split(args.src, "t10k", args.per_class_test)
    write_npz(args.out, dict(images=tr_x, labels=tr_y, index=tr_i, test_images=te_x, test_labels=te_y, test_index=te_i))
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out}: train {tr_x.shape}, test {te_x.shape}, {args.out.stat().st_size} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
