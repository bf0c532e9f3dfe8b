"""Datasets: the packaged digits, deterministic epoch order through the mlx-data
pipeline, IDX parsing, MNIST from the data directory, offline messages, PNG writer."""

from __future__ import annotations

import gzip
import struct
import zlib

import numpy as np
import pytest

import genmlx  # noqa: F401
import mlx.core as mx

from genmlx.harness.config import load_config
from genmlx.harness.data import DataError, build_image_data, epoch_order, load_digits, load_mnist, read_idx
from genmlx.harness.logging import image_grid, png_bytes
from tests.conftest import require_data


def test_packaged_digits():
    x, y = load_digits()
    assert x.shape == (1797, 64) and y.shape == (1797,)
    assert x.min() == 0.0 and x.max() == 1.0 and set(np.unique(y)) == set(range(10))
    d = build_image_data(load_config(None, []).data)
    assert len(d.train) + len(d.valid) + len(d.test) == 1797 and d.image_shape == (8, 8)


@pytest.mark.parametrize("resident_mb", ["1024", "0"])
def test_epoch_order_is_a_pure_function_and_resumable(resident_mb):
    """The same for batches gathered from a device copy of the split (default for small
    splits) and for the mlx-data pipeline (``data.device_resident_mb=0``)."""
    d = build_image_data(load_config(None, ["data.batch_size=32", f"data.device_resident_mb={resident_mb}"]).data)
    assert d.device_resident == (resident_mb != "0")
    nb = d.batches_per_epoch
    assert np.array_equal(epoch_order(5, 2, 100), epoch_order(5, 2, 100))
    assert not np.array_equal(epoch_order(5, 2, 100), epoch_order(5, 3, 100))
    stream = d.batches(seed=7, start_step=0)
    full = [np.asarray(next(stream)) for _ in range(2 * nb + 3)]
    # each epoch visits nb·B distinct examples
    ep0 = np.concatenate(full[:nb])
    assert len({r.tobytes() for r in ep0}) == len({r.tobytes() for r in d.train[epoch_order(7, 0, len(d.train))[:nb * 32]]})
    # starting at any step reproduces the same batches
    for start in (1, nb - 1, nb, nb + 2):
        s = d.batches(seed=7, start_step=start)
        for i in range(start, 2 * nb + 3):
            assert np.array_equal(np.asarray(next(s)), full[i])


def test_device_resident_batches_equal_the_pipeline_batches():
    """Both batch sources give the same arrays, from any start step (resume)."""
    cfgs = [load_config(None, ["data.batch_size=50", f"data.device_resident_mb={mb}"]).data for mb in (64, 0)]
    dev, pipe = (build_image_data(c) for c in cfgs)
    assert dev.device_resident and not pipe.device_resident
    for start in (0, 3, dev.batches_per_epoch + 1):
        a, b = dev.batches(seed=3, start_step=start), pipe.batches(seed=3, start_step=start)
        for _ in range(dev.batches_per_epoch + 2):
            x, y = next(a), next(b)
            assert x.shape == (50, 64) and np.array_equal(np.asarray(x), np.asarray(y))


def test_dynamic_binarization_depends_only_on_the_key():
    d = build_image_data(load_config(None, []).data)
    x = mx.array(d.train[:50])
    a, b = d.prepare(mx.random.key(1), x), d.prepare(mx.random.key(1), x)
    c = d.prepare(mx.random.key(2), x)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
    assert set(np.unique(np.asarray(a))) <= {0.0, 1.0}
    # mean over many draws approaches the intensities
    m = np.mean([np.asarray(d.prepare(mx.random.key(k), x)) for k in range(200)], axis=0)
    assert np.abs(m - d.train[:50]).max() < 3.5 * 0.5 / np.sqrt(200)


def test_read_idx_and_truncation():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 3, 4) + arr.tobytes()
    assert np.array_equal(read_idx(raw), arr)
    with pytest.raises(DataError, match="truncated"):
        read_idx(raw[:-3])
    with pytest.raises(DataError, match="magic"):
        read_idx(b"\x01\x02\x03\x04")


def test_mnist_from_the_data_dir(genmlx_data):
    require_data(genmlx_data, "mnist", "t10k-images-idx3-ubyte.gz")
    m = load_mnist(str(genmlx_data), download=False)
    assert m["train"].shape == (60000, 784) and m["test"].shape == (10000, 784)
    assert abs(float(m["train"].mean()) - 0.1307) < 1e-3


def test_mnist_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("GENMLX_DATA", str(tmp_path / "none"))
    monkeypatch.setenv("GENMLX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="(?s)not found.*GENMLX_DATA"):
        load_mnist("", download=False)


def test_png_writer():
    img = image_grid(np.linspace(0, 1, 4 * 64).reshape(4, 64), (8, 8), cols=2)
    png = png_bytes(img)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", png[16:24])
    assert (h, w) == img.shape
    idat = png[png.index(b"IDAT") + 4:png.index(b"IEND") - 8]
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, w + 1)
    assert (rows[:, 0] == 0).all()
    assert np.array_equal(rows[:, 1:], (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))


def test_mnist_download_is_cached_and_checked(genmlx_data, tmp_path, monkeypatch):
    """Online path with the network replaced by the reference files: the first load
    downloads into the cache, the second reads the cache; a corrupt download is caught."""
    require_data(genmlx_data, "mnist", "t10k-images-idx3-ubyte.gz")
    import io
    import urllib.request

    served = []

    def fake_urlopen(url, timeout=None):
        name = url.rsplit("/", 1)[1]
        served.append(name)
        return io.BytesIO((genmlx_data / "mnist" / name).read_bytes())

    monkeypatch.delenv("GENMLX_DATA", raising=False)
    monkeypatch.setenv("GENMLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    m = load_mnist("", download=True)
    assert m["test"].shape == (10000, 784) and len(served) == 2
    assert (tmp_path / "cache" / "mnist" / "t10k-images-idx3-ubyte.gz").exists()
    load_mnist("", download=True)
    assert len(served) == 2  # cached
    bad = tmp_path / "cache" / "mnist" / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(bad.read_bytes()))
    raw[100] ^= 1
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="checksum mismatch"):
        load_mnist("", download=True)
