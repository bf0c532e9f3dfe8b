"""Test cases of the sharded end-of-run paths (the halo-paths kernel and its statement):
R virtual processes of m slots, T = 9 steps, sorted ancestors that drift a few slots,
kinds of float32, float16 [3], float32 [2] and float32 [4] per row."""

from __future__ import annotations

import numpy as np

from genmlx.kernels import paths as KP

FLAGS = (True, True, False, True, False, True, True, False, True)


def halo_cases(R_: int, m: int, H: int):
    """Per halo width h in (H, 1) and process r: (h, r, own ancestor blocks, the gathered
    ancestor edges EA, own kept rows, the gathered kept edges EX, the statement's paths,
    its miss flag). A one-row halo is left by some lineage: the miss flag's cases."""
    T, n = len(FLAGS), R_ * m
    rng = np.random.default_rng(m)
    anc = [np.clip(np.sort(np.arange(n) + rng.integers(-3, 8, n)), 0, n - 1).astype(np.int32) for _ in range(T)]
    # rows of 4, 6, 8 and 16 bytes: element words, 8-byte and 16-byte vector words (kernels._rows)
    xs = [rng.normal(size=(T, n)).astype(np.float32), rng.normal(size=(T, n, 3)).astype(np.float16),
          rng.normal(size=(T, n, 2)).astype(np.float32), rng.normal(size=(T, n, 4)).astype(np.float32)]
    ks = [t for t in range(T) if FLAGS[t]]
    for h in (H, 1):
        EA = np.concatenate([np.stack([np.concatenate([anc[t][q * m:q * m + h], anc[t][(q + 1) * m - h:(q + 1) * m]])
                                       for t in ks]) for q in range(R_)])
        EX = [np.concatenate([np.concatenate([x[:, q * m:q * m + h], x[:, (q + 1) * m - h:(q + 1) * m]], axis=1)
                              for q in range(R_)]) for x in xs]
        for r in range(R_):
            idxs = [a[r * m:(r + 1) * m] for a in anc]
            own = [[x[t, r * m:(r + 1) * m] for t in range(T)] for x in xs]
            want, bad = KP.halo_paths_reference(idxs, FLAGS, EA, own, EX, r, R_, h)
            yield h, r, idxs, EA, own, EX, want, bad
