"""Run logging: JSONL metrics, TensorBoard (tensorboardX), PNG images, progress.

- ``metrics.jsonl``: one JSON object per logged step (``{"step": …, "tag": value, …}``);
  on resume the records after the resumed step are dropped so the file matches an
  uninterrupted run.
- TensorBoard event files in ``<run>/tb`` (scalars, histograms, images, hparams);
  ``purge_step`` on resume hides the records of the lost steps.
- Images are encoded by :func:`png_bytes` (a 30-line zlib PNG writer), so no imaging
  library is needed.
- Progress: a tqdm bar on a terminal; in non-TTY logs (CI, ``nohup``), one plain
  tqdm-formatted line per log interval instead of carriage-return redraws.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np


# -- images ----------------------------------------------------------------------------------
def png_bytes(img: np.ndarray) -> bytes:
    """Encode a greyscale ``[H, W]`` or RGB ``[H, W, 3]`` image (floats in [0, 1] or
    uint8) as PNG: signature, IHDR, one zlib-compressed IDAT (filter 0 rows), IEND."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if a.ndim == 2:
        color = 0
    elif a.ndim == 3 and a.shape[2] == 3:
        color = 2
    else:
        raise ValueError(f"png_bytes: expected [H, W] or [H, W, 3], got shape {a.shape}")
    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + a[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def image_grid(images: np.ndarray, shape: tuple, cols: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile ``[n, H·W]`` images into one ``[rows·(H+pad), cols·(W+pad)]`` greyscale grid."""
    x = np.asarray(images, dtype=np.float32).reshape(-1, *shape)
    n = len(x)
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    H, W = shape
    out = np.ones((rows * (H + pad) + pad, cols * (W + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        out[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = x[i]
    if scale > 1:
        out = np.kron(out, np.ones((scale, scale), dtype=np.float32))
    return out


def write_png(path: str | Path, img: np.ndarray) -> Path:
    p = Path(path)
    p.write_bytes(png_bytes(img))
    return p


# -- metrics -----------------------------------------------------------------------------------
def _jsonable(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f if math.isfinite(f) else str(f)


class MetricsLog:
    """Append-only JSONL metrics file plus an optional TensorBoard writer."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
            self.path.write_text("".join(k + "\n" for k in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            kw = {"purge_step": resume_step + 1} if resume_step is not None else {}
            self.tb = SummaryWriter(logdir=str(self.run_dir / "tb"), flush_secs=10, **kw)

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        rec = {"step": step}
        for k, v in values.items():
            tag = f"{prefix}{k}"
            rec[tag] = _jsonable(v)
            if self.tb is not None and _is_number(v):
                self.tb.add_scalar(tag, float(v), step)
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def histogram(self, tag: str, values, step: int) -> None:
        if self.tb is not None:
            a = np.asarray(values, dtype=np.float32).ravel()
            if a.size and np.all(np.isfinite(a)):
                self.tb.add_histogram(tag, a, step)

    def image(self, tag: str, img: np.ndarray, step: int) -> None:
        """Log a greyscale/RGB image (encoded by :func:`png_bytes`)."""
        if self.tb is None:
            return
        from tensorboardX.proto.summary_pb2 import Summary

        a = np.asarray(img)
        h, w = a.shape[:2]
        im = Summary.Image(height=h, width=w, colorspace=1 if a.ndim == 2 else 3, encoded_image_string=png_bytes(a))
        self.tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=im)]), step)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        if self.tb is None:
            return
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        mt = {f"hparam/{k}": float(v) for k, v in metrics.items() if _is_number(v)}
        self.tb.add_hparams(hp, mt, name="hparams")

    def close(self) -> None:
        self._f.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def _is_number(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


# -- progress ---------------------------------------------------------------------------------------
class Progress:
    """A tqdm bar on a TTY; plain tqdm-formatted lines (one per ``update_every`` steps)
    otherwise. ``mode``: auto | bar | lines | off."""

    def __init__(self, total: int, initial: int = 0, mode: str = "auto", desc: str = "train", stream=None):
        from tqdm import tqdm

        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode, self.total, self.n, self.desc = mode, total, initial, desc
        self.t0, self.n0 = time.time(), initial
        self._tqdm = tqdm
        self.bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream, dynamic_ncols=True,
                        unit="step") if mode == "bar" else None
        self.postfix: dict = {}

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if postfix:
            self.postfix = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)

    def line(self) -> None:
        """In lines mode, print the current state as one line."""
        if self.mode != "lines":
            return
        elapsed = time.time() - self.t0
        rate = (self.n - self.n0) / elapsed if elapsed > 0 else None
        post = ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        s = self._tqdm.format_meter(self.n, self.total, elapsed, prefix=self.desc, rate=rate, postfix=post, ncols=0)
        print(s, file=self.stream, flush=True)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        elif self.mode != "off":
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
