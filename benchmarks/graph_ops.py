"""Graph size of a compiled training step: a CPU proxy for GPU kernel launches.

On a GPU every primitive that survives ``mx.compile``'s fusion is (at least) one kernel
launch, ~5–10 µs each, so a small step is launch-bound. This tool calls a compiled step
once *lazily* (inputs and state evaluated first), writes the graph of everything the call
produced (its outputs and the updated parameters / optimizer state) with
``mx.export_to_dot`` and counts the primitive nodes by class:

* ``fused``      — ``Compiled…`` nodes: elementwise chains fused by ``mx.compile`` (1 kernel);
* ``elementwise``— elementwise primitives left alone (1 kernel each);
* ``kernel``     — non-fusable work: matmuls, reductions, gathers/scatters, RNG, concat,
  copies, sorts, … (≥ 1 kernel each), broken down in ``by_name``;
* ``view``       — broadcasts, reshapes, slices, transposes, stop_gradient, … (normally
  no kernel; a reshape of a non-contiguous array copies).

``launches`` = fused + elementwise + kernel. The same step traced *without* compilation
(``--traced``) shows the primitives before fusion (elementwise vs non-fusable).

It also times the compiled steps at tiny batches (where a CPU step is per-op overhead).

Run: ``.venv/bin/python benchmarks/graph_ops.py [--batch 64] [--iwae-k 50] [--time [--tiny]
[--batches 1 8] [--repeats 30]]``; ``GRAPH_OPS_DESCRIBE=1`` prints each counted graph.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import genmlx as gm  # noqa: E402,F401  (before mlx.core: fast BLAS)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

VIEWS = frozenset({
    "Broadcast", "BroadcastAxes", "Reshape", "Squeeze", "ExpandDims", "Slice", "Transpose",
    "AsStrided", "StopGradient", "Depends", "Split", "Flatten", "Unflatten", "NumberOfElements",
    "Real", "Imag", "View", "CustomTransforms", "Contiguous",
})
ELEMENTWISE = frozenset({
    "Abs", "Add", "ArcCos", "ArcCosh", "ArcSin", "ArcSinh", "ArcTan", "ArcTan2", "ArcTanh",
    "AsType", "BitwiseBinary", "BitwiseInvert", "Ceil", "Conjugate", "Cos", "Cosh", "Divide",
    "Equal", "Erf", "ErfInv", "Exp", "Expm1", "Floor", "Greater", "GreaterEqual", "Imag",
    "Less", "LessEqual", "Log", "Log1p", "LogAddExp", "LogicalAnd", "LogicalNot", "LogicalOr",
    "Maximum", "Minimum", "Multiply", "Negative", "NotEqual", "Power", "Remainder", "Round",
    "Select", "Sigmoid", "Sign", "Sin", "Sinh", "Sqrt", "Rsqrt", "Square", "Subtract", "Tan",
    "Tanh", "Full", "NaNEqual", "IsNaN", "IsInf", "DivMod",
})
KERNEL_GROUPS = {
    "matmul": ("Matmul", "AddMM", "BlockMaskedMM", "GatherMM", "QuantizedMatmul"),
    "reduce": ("Reduce", "Sum", "Max", "Min", "Prod", "And", "Or", "ArgReduce", "LogSumExp",
               "Softmax", "Scan", "CumSum"),
    "gather/scatter": ("Gather", "GatherAxis", "Scatter", "ScatterAxis", "Take"),
    "rng": ("RandomBits",),
    "copy/concat": ("Copy", "Concatenate", "Pad", "SliceUpdate", "Arange"),
}

_NODE = re.compile(r'\{ (\d+) \[label ="([^"]*)", shape=rectangle\]; \}')


def classify(name: str) -> str:
    """'fused', 'view', 'elementwise' or 'kernel' for a primitive's DOT label."""
    if name.startswith("Compiled"):
        return "fused"
    base = name.split(" ")[0]
    if base in VIEWS:
        return "view"
    if base in ELEMENTWISE:
        return "elementwise"
    return "kernel"


def kernel_group(name: str) -> str:
    base = name.split(" ")[0]
    for group, names in KERNEL_GROUPS.items():
        if any(base.startswith(n) for n in names):
            return group
    return "other"


@dataclass
class GraphCount:
    """Primitive nodes of one graph, by class (see the module docstring)."""

    fused: int = 0
    elementwise: int = 0
    kernel: int = 0
    view: int = 0
    by_name: Counter = field(default_factory=Counter)
    by_group: Counter = field(default_factory=Counter)

    @property
    def launches(self) -> int:
        return self.fused + self.elementwise + self.kernel

    @property
    def nodes(self) -> int:
        return self.launches + self.view

    def row(self) -> list:
        groups = ", ".join(f"{g} {n}" for g, n in sorted(self.by_group.items()))
        return [self.launches, self.fused, self.elementwise, self.kernel, self.view, groups]


def count_graph(outputs) -> GraphCount:
    """Count the primitives of the lazy graph that produces ``outputs`` (any tree of
    arrays). Evaluated arrays are graph inputs and contribute nothing."""
    text = _dot([a for _, a in tree_flatten(outputs) if isinstance(a, mx.array)])
    out = GraphCount()
    for _, name in dict(_NODE.findall(text)).items():
        cls = classify(name)
        setattr(out, cls, getattr(out, cls) + 1)
        if cls == "kernel":
            out.by_name[name] += 1
            out.by_group[kernel_group(name)] += 1
        elif cls == "elementwise":
            out.by_name[name] += 1
    return out


def _dot(leaves) -> str:
    fd, path = tempfile.mkstemp(suffix=".dot")
    os.close(fd)
    try:
        mx.export_to_dot(path, *leaves)
        return Path(path).read_text()
    finally:
        os.unlink(path)


def describe(outputs) -> list[str]:
    """One line per non-view primitive of the graph of ``outputs``, in topological
    order: its label and the labels of the non-view primitives feeding it (looking
    through views), for reading where the launches come from."""
    leaves = [a for _, a in tree_flatten(outputs) if isinstance(a, mx.array)]
    text = _dot(leaves)
    labels = dict(_NODE.findall(text))
    order = [n for n, _ in _NODE.findall(text)]
    producer, inputs = {}, {}
    for a, b in re.findall(r'^"?([^"\s]+)"? -> "?([^"\s]+)"?$', text, flags=re.M):
        if b in labels:      # array -> primitive
            inputs.setdefault(b, []).append(a)
        elif a in labels:    # primitive -> array
            producer[b] = a

    def sources(node, seen):
        out = []
        for arr in inputs.get(node, []):
            p = producer.get(arr)
            if p is None or p in seen:
                continue
            seen.add(p)
            out += sources(p, seen) if classify(labels[p]) == "view" else [labels[p]]
        return out

    return [f"{labels[n]:40s} <- {', '.join(sources(n, set()))}" for n in order
            if classify(labels[n]) != "view"]


def step_graph(step: Callable, state: Callable[[], Any], key: mx.array, x: mx.array,
               all_outputs: bool = False) -> GraphCount:
    """Graph of one lazy call ``step(key, x)``: its loss and the updated state
    (``state()``: the parameters, which the optimizer moments feed), as
    ``benchmarks/bench_vae.py`` evaluates it; with ``all_outputs`` also every metric the
    step returns (as the training harness evaluates it: ``grad_norm``, ``bound``, …).
    State and inputs are evaluated first so that only this step's work is counted."""
    mx.eval(state(), key, x)
    out = step(key, x)
    loss = out["loss"] if isinstance(out, dict) else out
    target = [out if all_outputs else loss, state()]
    g = count_graph(target)
    if os.environ.get("GRAPH_OPS_DESCRIBE"):
        print("\n".join(describe(target)))
    mx.eval(out, state())
    return g


# -- the steps under comparison (benchmarks/bench_vae.py) --------------------------------------
def build_steps(objective: str, K: int, hidden, latent: int) -> dict[str, tuple[Callable, Callable]]:
    """{"genmlx": (step, state), "mlx": (step, state)} with identical initial parameters;
    ``step(key, x)`` returns the loss (genmlx: its metrics dict)."""
    from benchmarks.bench_vae import genmlx_step, handwritten_step, make_modules

    steps = {}
    for name, build in (("genmlx", genmlx_step), ("mlx", handwritten_step)):
        enc, dec = make_modules(0, hidden, latent)
        step = build(enc, dec, objective, K)
        steps[name] = (step, lambda enc=enc, dec=dec: [enc.parameters(), dec.parameters()])
    return steps


def _loss(out):
    return out["loss"] if isinstance(out, dict) else out


def _data(B: int) -> mx.array:
    return (mx.random.uniform(shape=(B, 784), key=mx.random.key(B)) < 0.3).astype(mx.float32)


def graph_table(configs, batch: int) -> list[list[Any]]:
    rows = []
    for label, objective, K, hidden, latent in configs:
        for impl, (step, state) in build_steps(objective, K, hidden, latent).items():
            x = _data(batch)
            keys = mx.random.split(mx.random.key(1), 4)
            mx.eval(step(keys[0], x), state())  # warm-up: compile (and record noise plans)
            g = step_graph(step, state, keys[1], x)
            g_all = step_graph(step, state, keys[2], x, all_outputs=True)
            rows.append([label, impl, *g.row(), g_all.launches])
    return rows


def time_table(configs, batches, repeats: int) -> list[list[Any]]:
    """Median step times (loss and updated parameters evaluated, as counted by
    :func:`step_graph`; the metrics are left unevaluated, as in ``bench_vae.py``) and
    the median of paired genmlx / hand-written ratios, interleaved."""
    from benchmarks._timing import fmt_seconds, timeit_interleaved
    import statistics

    rows = []
    for label, objective, K, hidden, latent in configs:
        steps = build_steps(objective, K, hidden, latent)
        keys = iter(mx.random.split(mx.random.key(0), 100000))
        for B in batches:
            x = _data(B)
            mx.eval(x)
            fns = {n: (lambda x, s=s: [_loss(s[0](next(keys), x)), s[1]()]) for n, s in steps.items()}
            t = timeit_interleaved(fns, x, warmup=5, repeats=repeats, min_total=0.3)
            paired = statistics.median(a / b for a, b in zip(t["genmlx"].times, t["mlx"].times))
            rows.append([label, B, fmt_seconds(t["genmlx"].median), fmt_seconds(t["mlx"].median),
                         f"{paired:.2f}"])
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    from benchmarks._timing import markdown_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="batch for the graph counts")
    ap.add_argument("--iwae-k", type=int, default=50)
    ap.add_argument("--time", action="store_true", help="also time the steps at tiny batches")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tiny", action="store_true", help="time narrow (16-unit, 4-latent) networks")
    ap.add_argument("--names", action="store_true", help="list non-fused primitive names")
    args = ap.parse_args()
    configs = [
        ("VAE ELBO (784-200-2x10)", "elbo", 1, (200,), 10),
        (f"IWAE k={args.iwae_k} (784-200-200-2x50)", "iwae", args.iwae_k, (200, 200), 50),
    ]
    rows = graph_table(configs, args.batch)
    print(markdown_table(["step", "impl", "launches (loss + state)", "fused", "lone elementwise",
                          "non-fusable", "views", "non-fusable by kind",
                          "launches (+ all metrics)"], rows))
    if args.names:
        for label, objective, K, hidden, latent in configs:
            for impl, (step, state) in build_steps(objective, K, hidden, latent).items():
                x = _data(args.batch)
                keys = mx.random.split(mx.random.key(1), 3)
                mx.eval(step(keys[0], x), state())
                g = step_graph(step, state, keys[1], x)
                print(label, impl, dict(g.by_name.most_common()))
    if args.time:
        if args.tiny:  # per-op overhead dominates: narrow layers
            configs = [("VAE ELBO (784-16-2x4)", "elbo", 1, (16,), 4),
                       (f"IWAE k={args.iwae_k} (784-16-16-2x4)", "iwae", args.iwae_k, (16, 16), 4)]
        rows = time_table(configs, args.batches, args.repeats)
        print(markdown_table(["step", "batch", "genmlx", "hand-written MLX", "median paired ratio"], rows))


if __name__ == "__main__":
    main()
