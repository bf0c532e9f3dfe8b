"""Datasets and mlx-data pipelines for training.

Image datasets hold pixel intensities in [0, 1] (or fixed binary values) as float32
arrays ``[N, D]``. The training order is a pure function of ``(seed, epoch)``: epoch e
visits ``permutation(seed, e)`` in batches of ``batch_size`` (the last partial batch is
dropped so every compiled step sees one shape), so step ``t`` always reads batch
``t mod nb`` of epoch ``t // nb`` — which is what makes resuming exact. A training split
of at most ``data.device_resident_mb`` stays on the device as one array and each batch is
one gather there (host work per step: none but the index slice); larger splits stream
through ``buffer_from_vector → perm → batch → ordered_prefetch`` (mlx-data), whose
per-example host cost bounds the throughput (~3 µs per MNIST image on one core). Both
give the same batches.

Dynamic binarization (each pixel redrawn as Bernoulli(intensity) every time an image is
used) happens in :meth:`ImageData.prepare` with a key derived from the step.

Data directory: ``data.data_dir`` in the config, else ``$GENMLX_DATA``, else the cache
``$GENMLX_CACHE`` or ``~/.cache/genmlx`` (MNIST is downloaded there when allowed).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

import numpy as np

import mlx.core as mx

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# (prefix, suffix) of the sha256 of the *uncompressed* image files
MNIST_SHA = {"train_images": ("ba891046", "776db"), "test_images": ("0fa7898d", "494ce7")}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


class DataError(RuntimeError):
    """A dataset could not be found, read or downloaded (the message says what to do)."""


# -- locations --------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("GENMLX_CACHE", Path.home() / ".cache" / "genmlx"))


def data_dirs(data_dir: str = "") -> list[Path]:
    """Directories searched for data files, in order."""
    out = []
    if data_dir:
        out.append(Path(data_dir))
    if os.environ.get("GENMLX_DATA"):
        out.append(Path(os.environ["GENMLX_DATA"]))
    out.append(cache_dir())
    return out


def find_file(rel: str, data_dir: str = "") -> Path | None:
    for d in data_dirs(data_dir):
        p = d / rel
        if p.exists():
            return p
    return None


# -- readers ------------------------------------------------------------------------------
def read_idx(raw: bytes) -> np.ndarray:
    """Parse an IDX file (MNIST's format): magic 0x0000 (type) (ndim), big-endian dims."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError("not an IDX file (bad magic number)")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(raw[2])
    if dtype is None:
        raise DataError(f"IDX: unknown element type 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"IDX: expected {int(np.prod(dims))} values, found {data.size} (truncated file?)")
    return data.reshape(dims)


def _download(name: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for base in MNIST_MIRRORS:
        try:
            with urllib.request.urlopen(base + name, timeout=30) as r:
                blob = r.read()
            tmp = dest.with_suffix(dest.suffix + ".part")
            tmp.write_bytes(blob)
            os.replace(tmp, dest)
            return
        except OSError as e:  # URLError is an OSError
            errors.append(f"{base}{name}: {e}")
    raise DataError("could not download MNIST:\n  " + "\n  ".join(errors))


def load_mnist(data_dir: str = "", download: bool = True) -> dict[str, np.ndarray]:
    """MNIST images as float32 intensities in [0, 1], shape [N, 784]; keys train/test."""
    out = {}
    for key, fname in MNIST_FILES.items():
        if "labels" in key:
            continue
        p = find_file(f"mnist/{fname}", data_dir)
        if p is None:
            target = cache_dir() / "mnist" / fname
            if not download:
                raise DataError(_offline_msg(fname, data_dir))
            try:
                _download(fname, target)
            except DataError as e:
                raise DataError(f"{e}\n{_offline_msg(fname, data_dir)}") from None
            p = target
        raw = gzip.decompress(p.read_bytes())
        sha = hashlib.sha256(raw).hexdigest()
        pre, suf = MNIST_SHA[key]
        if not (sha.startswith(pre) and sha.endswith(suf)):
            raise DataError(f"{p}: checksum mismatch (sha256 {sha[:8]}…{sha[-5:]}, expected {pre}…{suf}); delete it and retry")
        imgs = read_idx(raw)
        out[key.split("_")[0]] = imgs.reshape(imgs.shape[0], -1).astype(np.float32) / 255.0
    return out


def _offline_msg(fname: str, data_dir: str) -> str:
    where = ", ".join(str(d / "mnist") for d in data_dirs(data_dir))
    return (f"MNIST file {fname} not found (looked in {where}). Either go online (it is downloaded "
            f"to {cache_dir() / 'mnist'} automatically), or copy the four standard files "
            f"(train-images-idx3-ubyte.gz, …) into <dir>/mnist/ and set GENMLX_DATA=<dir> or "
            f"data.data_dir=<dir>.")


def load_binarized_mnist(data_dir: str = "") -> dict[str, np.ndarray]:
    """The fixed binarization (Larochelle): train 50000, valid 10000, test 10000, {0,1}."""
    p = find_file("binarized_mnist.npz", data_dir)
    if p is None:
        where = ", ".join(str(d) for d in data_dirs(data_dir))
        raise DataError(f"binarized_mnist.npz not found (looked in {where}); set GENMLX_DATA or "
                        f"data.data_dir to the directory that holds it")
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k].astype(np.float32) for k in ("train", "valid", "test")}


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 packaged 8×8 digits: (intensities in [0, 1] [1797, 64], labels [1797])."""
    blob = resources.files("genmlx.data").joinpath("digits.csv.gz").read_bytes()
    arr = np.loadtxt(io.StringIO(gzip.decompress(blob).decode()), delimiter=",", dtype=np.float32)
    return arr[:, :64] / 16.0, arr[:, 64].astype(np.int64)


# -- the dataset object used by the runner -------------------------------------------------
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The visiting order of epoch ``epoch``: a pure function of (seed, epoch)."""
    return np.random.Generator(np.random.Philox(key=[seed, epoch])).permutation(n)


@dataclass
class ImageData:
    """Train/valid/test splits ``[N, D]`` of an image dataset and its binarization.

    ``binarization``: "dynamic" (Bernoulli(intensity) redrawn per use), "threshold"
    (intensity ≥ 0.5, fixed), "fixed" (data already binary), "none" (raw values)."""

    name: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    binarization: str
    image_shape: tuple | None
    batch_size: int
    prefetch: int = 2
    device_resident_mb: float = 1024.0

    def __post_init__(self):
        if self.binarization == "threshold":
            self.train, self.valid, self.test = ((a >= 0.5) for a in (self.train, self.valid, self.test))
        self.train, self.valid, self.test = (np.ascontiguousarray(a, dtype=np.float32) for a in (self.train, self.valid, self.test))
        if len(self.train) < self.batch_size:
            raise DataError(f"data.batch_size: {self.batch_size} is larger than the training split ({len(self.train)} examples)")
        self._buffer = None
        self._resident = None

    @property
    def device_resident(self) -> bool:
        """Whether batches are gathered from a device copy of the training split."""
        return self.train.nbytes <= self.device_resident_mb * 2**20

    @property
    def dim(self) -> int:
        return int(self.train.shape[1])

    @property
    def batches_per_epoch(self) -> int:
        return len(self.train) // self.batch_size

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) read by optimizer step ``step`` (0-based)."""
        return divmod(step, self.batches_per_epoch)

    def _buf(self):
        import mlx.data as dx

        if self._buffer is None:
            self._buffer = dx.buffer_from_vector([{"x": row} for row in self.train])
        return self._buffer

    def epoch_batches(self, seed: int, epoch: int, start: int = 0) -> Iterator[mx.array]:
        """Batches ``start, start+1, …`` of epoch ``epoch`` (mlx-data pipeline)."""
        B, nb = self.batch_size, self.batches_per_epoch
        order = epoch_order(seed, epoch, len(self.train))[start * B: nb * B]
        if len(order) == 0:
            return iter(())
        if self.device_resident:
            if self._resident is None:
                self._resident = mx.array(self.train)
            rows = mx.array(order.astype(np.int32)).reshape(-1, B)  # the epoch's indices, one transfer
            return (mx.take(self._resident, rows[j], axis=0) for j in range(rows.shape[0]))
        stream = self._buf().perm(order.astype(np.int64).tolist()).batch(B).ordered_prefetch(max(self.prefetch, 1), 1)
        return (mx.array(b["x"]) for b in stream)

    def batches(self, seed: int, start_step: int) -> Iterator[mx.array]:
        """The infinite training stream from optimizer step ``start_step`` on."""
        epoch, i = self.position(start_step)
        while True:
            yield from self.epoch_batches(seed, epoch, i)
            epoch, i = epoch + 1, 0

    def prepare(self, key: mx.array, x: mx.array) -> mx.array:
        """Binarize a batch for one use: Bernoulli(x) under dynamic binarization."""
        if self.binarization == "dynamic":
            return (mx.random.uniform(shape=x.shape, key=key) < x).astype(mx.float32)
        return x

    def prepare_shard(self, key: mx.array, x: mx.array, r: int = 0, N: int = 1) -> mx.array:
        """Process r's rows ``[r·B/N, (r+1)·B/N)`` of the prepared global batch: the
        binarization noise is drawn for the whole batch with the step's key, so the N
        shards together are exactly the batch a one-process run trains on."""
        from genmlx.distributed import shard

        out = self.prepare(key, x)
        return out if N == 1 else shard(out, 0, r, N)

    def fixed_eval(self, split: str, n: int = 0, seed: int = 1234) -> mx.array:
        """A split (first n examples of a fixed random order; 0 = all), binarized once
        with a fixed key so every evaluation sees the same binary images."""
        arr = {"train": self.train, "valid": self.valid, "test": self.test}[split]
        if n and n < len(arr):
            arr = arr[np.random.Generator(np.random.Philox(key=[seed, 7])).permutation(len(arr))[:n]]
        x = mx.array(arr)
        return self.prepare(mx.random.key(seed), x)


@dataclass
class SimulatedData:
    """An endless dataset simulated from a generative model: each step draws a fresh
    batch of ``batch_size`` simulations with a key derived from the step. ``simulate``
    maps (key, n) → {name: array [n, …]}."""

    name: str
    simulate: object
    batch_size: int
    valid_size: int = 200
    image_shape: tuple | None = None
    binarization: str = "none"

    batches_per_epoch: int = 1 << 30

    def position(self, step: int) -> tuple[int, int]:
        return 0, step

    def batches(self, seed: int, start_step: int) -> Iterator[None]:
        while True:
            yield None

    def prepare(self, key: mx.array, x) -> dict:
        return self.simulate(key, self.batch_size)

    def prepare_shard(self, key: mx.array, x, r: int = 0, N: int = 1) -> dict:
        """Process r's B/N fresh simulations, drawn with ``split(key, N)[r]`` (so the
        processes simulate disjoint data without simulating the whole global batch; the
        draws differ from a one-process run's, their distribution does not)."""
        from genmlx.distributed import fold_rank

        if N == 1:
            return self.prepare(key, x)
        return self.simulate(fold_rank(key, r, N), self.batch_size // N)

    def fixed_eval(self, split: str, n: int = 0, seed: int = 1234) -> dict:
        salt = {"train": 0, "valid": 1, "test": 2}[split]
        return self.simulate(mx.random.key(seed + salt), n or self.valid_size)


def build_image_data(cfg_data, seed: int = 0) -> ImageData:
    """The image dataset named by a :class:`~genmlx.harness.config.DataConfig`."""
    d = cfg_data
    nv = d.valid_size
    if d.dataset == "digits":
        x, _ = load_digits()
        perm = epoch_order(0, 10**6, len(x))  # fixed split, independent of the run's seed
        test, rest = x[perm[:297]], x[perm[297:]]
        valid, train = rest[:nv], rest[nv:]
        shape = (8, 8)
    elif d.dataset == "mnist":
        m = load_mnist(d.data_dir, d.download)
        train, valid, test = m["train"][: len(m["train"]) - nv], m["train"][len(m["train"]) - nv:], m["test"]
        shape = (28, 28)
    elif d.dataset == "binarized_mnist":
        m = load_binarized_mnist(d.data_dir)
        train, valid, test = m["train"], m["valid"][:nv] if nv else m["valid"], m["test"]
        shape = (28, 28)
    else:
        raise DataError(f"data.dataset: {d.dataset!r} is not an image dataset")
    if d.test_size:
        test = test[: d.test_size]
    return ImageData(d.dataset, train, valid, test, d.binarization, shape, d.batch_size, d.prefetch,
                     d.device_resident_mb)
