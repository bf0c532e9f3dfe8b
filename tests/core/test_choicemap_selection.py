import mlx.core as mx
import pytest

import genmlx as gm


def test_choicemap_basics():
    cm = gm.choicemap({"x": 1.0, ("y", 3): 2.0, ("y", 4): mx.ones(2)})
    assert cm["x"].item() == 1.0 and cm["y", 3].item() == 2.0
    assert "x" in cm and ("y", 3) in cm and "y" in cm and "z" not in cm
    sub = cm.get_submap("y")
    assert sub[3].item() == 2.0 and len(sub) == 2
    assert dict((a, v.tolist()) for a, v in cm) == {"x": 1.0, ("y", 3): 2.0, ("y", 4): [1.0, 1.0]}
    d = cm.to_dict()
    assert set(d) == {"x", "y"} and set(d["y"]) == {3, 4}
    assert gm.ChoiceMap.empty().is_empty() and len(gm.ChoiceMap.empty()) == 0
    with pytest.raises(KeyError, match="'z'"):
        cm["z"]
    with pytest.raises(KeyError, match="sub-map"):
        cm["y"]


def test_choicemap_immutable_merge_and_set():
    a = gm.choicemap({"x": 1.0})
    b = gm.choicemap({("s", "y"): 2.0})
    m = a.merge(b)
    assert "x" in m and ("s", "y") in m and ("s", "y") not in a
    c = m.set("x", 5.0)
    assert c["x"].item() == 5.0 and m["x"].item() == 1.0
    with pytest.raises(gm.AddressCollisionError, match="'x'"):
        a.merge(gm.choicemap({"x": 3.0}))
    nested = gm.choicemap({"s": {"y": 1.0, "z": 2.0}})
    assert nested["s", "z"].item() == 2.0


def test_choicemap_flatten_round_trip_and_filter():
    cm = gm.choicemap({"x": 1.0, ("y", 3): mx.arange(3)})
    leaves, td = gm.tree_flatten(cm)
    assert len(leaves) == 2 and gm.tree_unflatten(td, leaves) == cm
    f = cm.filter(gm.select("y"))
    assert ("y", 3) in f and "x" not in f
    assert cm.filter(~gm.select("y"))["x"].item() == 1.0


def test_selection_algebra():
    s = gm.select("a", ("b", 1))
    assert "a" in s and ("a", "deep") in s and ("b", 1) in s and ("b", 2) not in s and "c" not in s
    assert "c" in ~s and "a" not in ~s and ("b", 2) in ~s
    t = gm.select("c")
    assert "c" in (s | t) and "a" in (s | t) and "d" not in (s | t)
    assert "a" in (s & gm.select("a", "c")) and "c" not in (s & gm.select("a", "c"))
    assert "anything" in gm.select_all() and "anything" not in gm.select_none()
    assert ("b", 1) not in (s & ~gm.select("b"))


def test_trace_accessors():
    @gm.gen
    def inner(m):
        return gm.normal(m, 1.0) @ "v"

    @gm.gen
    def model():
        a = gm.normal(0.0, 1.0) @ "a"
        return inner(a) @ "sub"

    tr = model.simulate(mx.random.key(0), ())
    assert tr.gen_fn is model and tr.args == ()
    assert tr["sub"].item() == tr["sub", "v"].item() == tr.retval.item()
    assert tr["a"].item() == tr.choices["a"].item()
    assert abs(tr.score.item() - model.assess((), tr.choices)[0].item()) < 1e-5
