"""StateSnapshots (genmlx.harness.step): the per-step snapshot taken for rollback restores
exactly the state before a compiled optimizer step, in place."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from genmlx.harness.step import StateSnapshots


def _setup():
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = optim.Adam(1e-2)
    opt.init(model.trainable_parameters())
    mx.eval(model.parameters(), opt.state)

    def loss(x):
        return mx.mean(model(x) ** 2)

    vg = nn.value_and_grad(model, loss)
    state = [model.state, opt.state]

    @mx.compile
    def _raw(x):
        lv, g = vg(x)
        opt.update(model, g)
        return lv

    step = mx.compile(lambda x: _raw(x), inputs=state, outputs=state)
    return model, opt, step


def _arrays(model, opt):
    return [np.array(v) for _, v in tree_flatten([model.parameters(), opt.state]) if isinstance(v, mx.array)]


def test_restore_puts_back_the_state_before_compiled_steps():
    model, opt, step = _setup()
    snaps = StateSnapshots(model, opt)
    before = _arrays(model, opt)
    snap = snaps.take()
    x = mx.ones((5, 3))
    for _ in range(3):
        mx.eval(step(x))
    moved = _arrays(model, opt)
    assert any(not np.array_equal(a, b) for a, b in zip(before, moved))
    snaps.restore(snap)
    for a, b in zip(before, _arrays(model, opt)):
        np.testing.assert_array_equal(a, b)
    # the compiled step still sees the restored containers: one step from here equals a fresh run
    mx.eval(step(x))
    model2, opt2, step2 = _setup()
    mx.eval(step2(x))
    for a, b in zip(_arrays(model2, opt2), _arrays(model, opt)):
        np.testing.assert_array_equal(a, b)


def test_tuple_state_falls_back_to_whole_trees_and_check_refinds_slots():
    model, opt, _ = _setup()
    opt.state["extra"] = (mx.zeros(2),)  # a tuple: slots cannot be written back
    snaps = StateSnapshots(model, opt)
    snap = snaps.take()
    assert snap[0] == "tree"
    del opt.state["extra"]
    snaps = StateSnapshots(model, opt)
    assert snaps.take()[0] == "slots"
    n = len(snaps.take()[1])
    opt.state["grown"] = mx.zeros(1)  # an optimizer that adds state after the slots were found
    snaps.check()
    assert len(snaps.take()[1]) == n + 1
