"""A reusable checker of the generative-function-interface laws.

``check_gfi_laws(gen_fn, args, key, ...)`` computes each side of every law
independently and compares them:

- assess(args, τ) = generate(args, τ) weight = tr.score for τ = simulate's choices;
- generate with no constraints has weight 0; propose's weight = assess of its choices;
- project(tr, select_all) = score, project(tr, select_none) = 0;
- update with new values σ at fixed-structure addresses: w = score' − score, the new
  trace holds σ, the discard holds the old values there, score' = assess(τ');
- regenerate(S): w = [score' − project(τ', S)] − [score − project(τ, S)] (the unselected
  part's density change), unselected values unchanged, score' = assess(τ');
- batched: each vsimulate particle is a valid execution scored by assess; vgenerate with
  per-particle constraints weighs each particle by its own choices; batched update /
  regenerate / project of particle i equal the unbatched operation with the i-th split key.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

import genmlx as gm
from genmlx.core.address import to_path


def _close(a, b, atol, what):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    inf = ~np.isfinite(b)
    if inf.any():
        assert np.array_equal(a[inf], b[inf]), f"{what}: {a} != {b}"
        a, b = np.where(inf, 0.0, a), np.where(inf, 0.0, b)
    tol = atol * max(1.0, float(np.max(np.abs(b))) if b.size else 1.0)
    assert np.allclose(a, b, atol=tol, rtol=0, equal_nan=True), f"{what}: {a} != {b}"


def _leaves(cm):
    return {p: np.asarray(v) for p, v in cm.leaves()}


def _restrict(cm, addrs):
    out = gm.ChoiceMap.empty()
    for a in addrs:
        out = out.set_submap(to_path(a), cm.get_submap(a))
    return out


def check_gfi_laws(gen_fn, args, key, *, update_addrs=(), regen_addrs=(), n: int = 3,
                   atol: float = 2e-5, batched: bool = True) -> None:
    k = mx.random.split(key, 6)
    tr = gen_fn.simulate(k[0], args)
    score = tr.score
    ch = tr.choices

    lp, _ = gen_fn.assess(args, ch)
    _close(lp, score, atol, "assess = score")
    tr_g, w = gen_fn.generate(k[1], args, ch)
    _close(w, score, atol, "generate(all choices) weight = score")
    _close(tr_g.score, score, atol, "generate(all choices) trace score")
    assert _leaves(tr_g.choices).keys() == _leaves(ch).keys()
    _, w0 = gen_fn.generate(k[1], args, gm.ChoiceMap.empty())
    _close(w0, 0.0, atol, "generate(no constraints) weight = 0")
    _close(gen_fn.project(tr, gm.select_all()), score, atol, "project(all) = score")
    _close(gen_fn.project(tr, gm.select_none()), 0.0, atol, "project(none) = 0")
    pch, pw, _ = gen_fn.propose(k[2], args)
    _close(pw, gen_fn.assess(args, pch)[0], atol, "propose weight = assess")

    # choice-map round trips
    leaves, td = gm.tree_flatten(ch)
    assert gm.tree_unflatten(td, leaves) == ch
    if not ch.is_leaf():
        assert gm.choicemap({a: v for a, v in ch}) == ch

    if update_addrs:
        other = gen_fn.simulate(k[3], args).choices
        cons = _restrict(other, update_addrs)
        new, wu, _, discard = gen_fn.update(k[4], tr, cons)
        _close(wu, new.score - score, atol, "update weight = score' − score")
        _close(gen_fn.assess(args, new.choices)[0], new.score, atol, "update: assess(τ') = score'")
        for p, v in cons.leaves():
            _close(new.choices[p], v, 0, f"update: new value at {p!r}")
        expect_discard = _restrict(ch, update_addrs)
        assert _leaves(discard).keys() == _leaves(expect_discard).keys()
        for p, v in expect_discard.leaves():
            _close(discard[p], v, 0, f"update: discard at {p!r}")
        for p, v in ch.leaves():
            if not any(p[: len(to_path(a))] == to_path(a) for a in update_addrs):
                _close(new.choices[p], v, 0, f"update keeps {p!r}")

    if regen_addrs:
        sel = gm.select(*regen_addrs)
        new, wr, _ = gen_fn.regenerate(k[4], tr, sel)
        expect = (new.score - gen_fn.project(new, sel)) - (score - gen_fn.project(tr, sel))
        _close(wr, expect, atol, "regenerate weight = Δ unselected density")
        _close(gen_fn.assess(args, new.choices)[0], new.score, atol, "regenerate: assess(τ') = score'")
        for p, v in ch.leaves():
            if not sel.contains_path(p):
                _close(new.choices[p], v, 0, f"regenerate keeps unselected {p!r}")

    if batched:
        _check_batched(gen_fn, args, k[5], update_addrs, regen_addrs, n, atol)


def _check_batched(gen_fn, args, key, update_addrs, regen_addrs, n, atol):
    k1, k2, k3 = mx.random.split(key, 3)
    btr = gen_fn.vsimulate(k1, args, n)
    assert btr.batch_size == n and btr.score.shape == (n,)
    for i in range(n):
        one = gm.unbatch(btr, i)
        # each particle is a valid execution: its score is the log density of its choices
        _close(btr.score[i], gen_fn.assess(args, one.choices)[0], atol, f"vsimulate particle {i} score")
    if n > 1:  # particles differ (continuous choices, so a tie has probability zero)
        for p, v in btr.choices.leaves():
            if mx.issubdtype(v.dtype, mx.floating):
                assert not np.allclose(np.asarray(v[0]), np.asarray(v[1])), f"particles equal at {p!r}"
    _close(gen_fn.project(btr, gm.select_all()), btr.score, atol, "batched project(all)")

    btr_g, bw = gen_fn.vgenerate(k2, args, btr.choices, n)  # per-particle constraints
    _close(bw, btr.score, atol, "vgenerate(per-particle all choices) weights = scores")

    if update_addrs:
        other = gen_fn.vsimulate(k3, args, n).choices
        cons = _restrict(other, update_addrs)
        new, w, _, disc = gen_fn.update(k2, btr, cons)
        ukeys = mx.random.split(k2, n)
        for i in range(n):
            ci = cons.map_values(lambda v: v[i])
            s_new, s_w, _, _ = gen_fn.update(ukeys[i], gm.unbatch(btr, i), ci)
            _close(w[i], s_w, atol, f"batched update weight particle {i}")
            _close(new.score[i], s_new.score, atol, f"batched update score particle {i}")
        for p, v in _restrict(btr.choices, update_addrs).leaves():
            _close(disc[p], v, 0, f"batched update discard at {p!r}")
    if regen_addrs:
        sel = gm.select(*regen_addrs)
        new, w, _ = gen_fn.regenerate(k3, btr, sel)
        rkeys = mx.random.split(k3, n)
        for i in range(n):
            s_new, s_w, _ = gen_fn.regenerate(rkeys[i], gm.unbatch(btr, i), sel)
            _close(w[i], s_w, atol, f"batched regenerate weight particle {i}")
            _close(new.score[i], s_new.score, atol, f"batched regenerate score particle {i}")
