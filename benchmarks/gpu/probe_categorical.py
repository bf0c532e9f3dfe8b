"""A categorical over many particles on a GPU: its draws and scores with the category
reductions as elementwise chains (genmlx's default over ≥ 2¹⁵ examples, K ≤ 8) against
MLX's reductions (argmax, logsumexp, take_along_axis), compiled, median µs per call
(evaluated, stream synchronised).

Per K: ``simulate`` — vsimulate of z ~ N(0, I_K), k ~ categorical(logits = z) (one draw
and one score per particle); ``generate`` — vgenerate of the same with k observed (the
index picked from the per-particle logits).

    python3 benchmarks/gpu/probe_categorical.py [--n 10000000] [--ks 3 8] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import genmlx as gm  # noqa: E402
import mlx.core as mx  # noqa: E402
import genmlx.distributions._categories as C  # noqa: E402

from _timing import device_time_us  # noqa: E402


def _model(K: int):
    @gm.gen
    def model():
        z = gm.normal(mx.zeros(K), 1.0) @ "z"
        return gm.categorical(logits=z) @ "k"

    return model


def probe(n: int, K: int, repeats: int) -> dict:
    obs = gm.choicemap({"k": mx.zeros((n,), dtype=mx.int32)})
    out = {"n": n, "K": K}
    chain = C._chain
    for name, rule in (("chain", chain), ("reduction", lambda batch, *xs: False)):
        C._chain = rule
        model = _model(K)  # a new model: nothing traced under the other rule is reused
        try:
            sim = mx.compile(lambda key: model.vsimulate(key, (), n).score)
            gen = mx.compile(lambda key: model.vgenerate(key, (), obs, n)[1])
            key = mx.random.key(0)
            out[f"simulate_{name}_us"] = device_time_us(lambda: sim(key), repeats)
            out[f"generate_{name}_us"] = device_time_us(lambda: gen(key), repeats)
        finally:
            C._chain = chain
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--ks", type=int, nargs="+", default=[3, 8])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = [probe(a.n, K, a.repeats) for K in a.ks]
    for r in res:
        print(json.dumps(r), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
