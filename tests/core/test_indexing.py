"""``row``: x[i] as a view (Slice), not MLX 0.32's Gather kernel."""

import re
import tempfile

import genmlx  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest

from genmlx.core.indexing import row


def _primitives(a: mx.array) -> list[str]:
    with tempfile.NamedTemporaryFile("w+", suffix=".dot") as f:
        mx.export_to_dot(f.name, a)
        return re.findall(r'label ="([^" ]*)', open(f.name).read())


def test_row_equals_indexing_and_is_a_view():
    x = mx.arange(24, dtype=mx.float32).reshape(4, 3, 2)
    mx.eval(x)
    for i in range(-4, 4):
        np.testing.assert_array_equal(np.array(row(x, i)), np.array(x)[i])
        prims = _primitives(row(x, i) * 2)
        assert "Gather" not in prims, prims
    assert "Gather" in _primitives(x[1] * 2)  # what row avoids (MLX 0.32)
    with pytest.raises(IndexError, match="row 4 out of range"):
        row(x, 4)
    with pytest.raises(IndexError, match="row -5 out of range"):
        row(x, -5)


def test_row_under_compile_and_vmap():
    x = mx.arange(12, dtype=mx.float32).reshape(3, 4)
    f = mx.compile(lambda a: row(a, -1) + row(a, 0))
    np.testing.assert_array_equal(np.array(f(x)), np.array(x)[-1] + np.array(x)[0])
    g = mx.vmap(lambda a: row(a, 1))  # per-row vector a [4] -> its element 1
    np.testing.assert_array_equal(np.array(g(x)), np.array(x)[:, 1])


def test_iota_is_a_constant_in_compiled_graphs():
    """``iota(n)`` equals ``arange(n)`` and leaves no primitive in a compiled function's
    graph (``mx.arange`` is one, run at every call)."""
    from genmlx.core.indexing import iota

    assert iota(5).dtype == mx.int32 and iota(5).tolist() == [0, 1, 2, 3, 4]
    x = mx.arange(6, dtype=mx.float32)
    mx.eval(x)
    with_iota = mx.compile(lambda a: a * iota(6))(x)
    with_arange = mx.compile(lambda a: a * mx.arange(6, dtype=mx.int32))(x)
    assert "Arange" not in _primitives(with_iota) and "Arange" in _primitives(with_arange)
    assert mx.array_equal(with_iota, with_arange).item()
