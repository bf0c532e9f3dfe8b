"""Recurse: tree-structured recursion with production and aggregation kernels.

``rec = gm.Recurse(production, aggregation, max_branch)`` is called as ``rec(v)``:

- ``production(v) → (u, children)`` (a GF) runs at each node; ``children`` is a Python
  list/tuple of at most ``max_branch`` argument values, one per child node;
- ``aggregation(u, results) → w`` (a GF) runs at each node after its children, with
  ``results`` the tuple of the children's aggregated values; the root's ``w`` is the
  return value.

Nodes are numbered breadth-first-compatibly: the root is 0 and child j of node p is
``p·max_branch + j + 1``. Choices of node p sit at ``("production", p, …)`` and
``("aggregation", p, …)``. The number of children must be decided without inspecting
array values (e.g. by a Python depth counter carried in ``v``), so the tree's shape is
static under ``vmap``; data-dependent pruning can be written with ``gm.Mask`` inside the
kernels.

    log p(τ; v) = Σ_nodes [log p_prod(τ_p^prod; v_p) + log p_agg(τ_p^agg; u_p, results_p)].

Recurse is a dynamic GF over this recursion, so all GFI operations (incremental
``update``/``regenerate`` of the node kernels included) and batching come from
:mod:`genmlx.core.dynamic`.
"""

from __future__ import annotations

from genmlx.core.dynamic import DynamicGF
from genmlx.core.gfi import GenerativeFunction
from genmlx.core.handlers import trace


class Recurse(DynamicGF):
    """Tree recursion ``production``/``aggregation``; see the module docstring."""

    def __init__(self, production: GenerativeFunction, aggregation: GenerativeFunction,
                 max_branch: int, max_nodes: int = 100_000):
        for what, g in (("production", production), ("aggregation", aggregation)):
            if not isinstance(g, GenerativeFunction):
                raise TypeError(f"Recurse: the {what} kernel must be a generative function, "
                                f"got {type(g).__name__}")
        if isinstance(max_branch, bool) or not isinstance(max_branch, int) or max_branch < 1:
            raise ValueError(f"Recurse: max_branch must be a positive int, got {max_branch!r}")
        self.production = production
        self.aggregation = aggregation
        self.max_branch = max_branch
        self.max_nodes = max_nodes
        super().__init__(self._body)
        self.name = f"Recurse({getattr(production, 'name', 'production')}, {getattr(aggregation, 'name', 'aggregation')})"

    def _body(self, v):
        count = [0]
        return self._visit(0, v, count)

    def _visit(self, node: int, v, count):
        count[0] += 1
        if count[0] > self.max_nodes:
            raise ValueError(f"Recurse: more than max_nodes={self.max_nodes} nodes; does the "
                             "production kernel ever return an empty child list?")
        out = trace(("production", node), self.production(v))
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ValueError(f"Recurse: the production kernel must return (u, children), got {type(out).__name__}")
        u, children = out
        children = tuple(children)
        if len(children) > self.max_branch:
            raise ValueError(f"Recurse: node {node} has {len(children)} children, more than "
                             f"max_branch={self.max_branch}")
        results = tuple(self._visit(node * self.max_branch + j + 1, c, count)
                        for j, c in enumerate(children))
        return trace(("aggregation", node), self.aggregation(u, results))

    def __eq__(self, other):
        return (isinstance(other, Recurse) and self.production == other.production
                and self.aggregation == other.aggregation and self.max_branch == other.max_branch)

    def __hash__(self):
        return hash((Recurse, self.production, self.aggregation, self.max_branch))

    def __repr__(self) -> str:
        return f"<gm.Recurse max_branch={self.max_branch}>"
