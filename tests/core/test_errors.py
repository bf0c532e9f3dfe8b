"""Modelling-language errors name the address and the generative function."""

import mlx.core as mx
import pytest

import genmlx as gm

KEY = mx.random.key(0)


def test_duplicate_address():
    @gm.gen
    def twice():
        gm.normal(0.0, 1.0) @ "x"
        gm.normal(0.0, 1.0) @ "x"

    with pytest.raises(gm.AddressCollisionError, match=r"'x'.*twice"):
        twice.simulate(KEY, ())


def test_prefix_collision():
    @gm.gen
    def clash():
        gm.normal(0.0, 1.0) @ "y"
        gm.trace(("y", 3), gm.normal(0.0, 1.0))

    with pytest.raises(gm.AddressCollisionError, match=r"\('y', 3\)"):
        clash.simulate(KEY, ())


def test_unvisited_constraint_named():
    @gm.gen
    def m():
        return gm.normal(0.0, 1.0) @ "x"

    with pytest.raises(gm.UnvisitedConstraintError, match=r"'xx'"):
        m.generate(KEY, (), gm.choicemap({"xx": 1.0}))
    tr = m.simulate(KEY, ())
    with pytest.raises(gm.UnvisitedConstraintError, match=r"'z'"):
        m.update(KEY, tr, gm.choicemap({"z": 1.0}))


def test_unvisited_constraint_in_submodel_has_full_path():
    @gm.gen
    def inner():
        return gm.normal(0.0, 1.0) @ "a"

    @gm.gen
    def outer():
        return inner() @ "sub"

    with pytest.raises(gm.UnvisitedConstraintError, match=r"\('sub', 'b'\)"):
        outer.generate(KEY, (), gm.choicemap({("sub", "b"): 1.0}))


def test_wrong_shape_constraint():
    @gm.gen
    def m():
        inner_val = gm.normal(mx.zeros(3), 1.0) @ "v"
        return inner_val

    @gm.gen
    def outer():
        return m() @ "sub"

    with pytest.raises(gm.ConstraintShapeError, match=r"\('sub', 'v'\).*\(2,\).*\(3,\)"):
        outer.generate(KEY, (), gm.choicemap({("sub", "v"): mx.zeros(2)}))


def test_trace_outside_execution():
    with pytest.raises(gm.TraceContextError, match="outside"):
        gm.trace("x", gm.normal(0.0, 1.0))
    with pytest.raises(gm.TraceContextError):
        gm.normal(0.0, 1.0) @ "x"


def test_handler_stack_clean_after_error():
    @gm.gen
    def bad():
        gm.normal(0.0, 1.0) @ "x"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        bad.simulate(KEY, ())
    with pytest.raises(gm.TraceContextError):
        gm.normal(0.0, 1.0) @ "x"


def test_assess_missing_choice():
    @gm.gen
    def m():
        gm.normal(0.0, 1.0) @ "x"
        return gm.normal(0.0, 1.0) @ "y"

    with pytest.raises(gm.MissingChoiceError, match="'y'"):
        m.assess((), gm.choicemap({"x": 0.0}))


def test_bad_invocation_type():
    @gm.gen
    def m():
        return gm.trace("x", 3.0)

    with pytest.raises(TypeError, match="'x'"):
        m.simulate(KEY, ())


def test_bad_parameter_named():
    with pytest.raises(ValueError, match="normal.*sigma"):
        gm.normal(0.0, -1.0)
    with gm.validation(False):
        gm.normal(0.0, -1.0)  # no error when validation is off


def test_vgenerate_bad_constraint_shape_names_address():
    @gm.gen
    def m():
        return gm.normal(mx.zeros(3), 1.0) @ "v"

    with pytest.raises(gm.ConstraintShapeError, match="'v'"):
        m.vgenerate(KEY, (), gm.choicemap({"v": mx.zeros((5, 2))}), 5)
