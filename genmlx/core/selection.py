"""Selections: immutable sets of addresses, closed under ~, | and &.

Selecting an address selects everything below it: ``select("z")`` contains
``("z", 3)``.
"""

from __future__ import annotations

from genmlx.core.address import Address, Path, to_path


class Selection:
    """Abstract selection. ``addr in s`` tests a full address; ``s.sub(key)`` is the
    selection seen from below ``key``."""

    def contains_path(self, path: Path) -> bool:
        node = self
        for k in path:
            if isinstance(node, AllSelection):
                return True
            if isinstance(node, NoneSelection):
                return False
            node = node.sub(k)
        return node.is_all_here()

    def __contains__(self, addr: Address) -> bool:
        return self.contains_path(to_path(addr))

    def sub(self, key) -> "Selection":
        raise NotImplementedError

    def subselection(self, path: Path) -> "Selection":
        node = self
        for k in path:
            node = node.sub(k)
        return node

    def is_all_here(self) -> bool:
        """Whether the address at which this selection sits is itself selected."""
        raise NotImplementedError

    def is_empty(self) -> bool:
        """True only when provably nothing is selected."""
        return False

    def __invert__(self) -> "Selection":
        return Complement(self)

    def __or__(self, other: "Selection") -> "Selection":
        return Union(self, other)

    def __and__(self, other: "Selection") -> "Selection":
        return Intersection(self, other)

    def __getstate__(self):
        raise TypeError("genmlx selections are not pickled")


class AllSelection(Selection):
    def sub(self, key):
        return self

    def is_all_here(self):
        return True

    def __invert__(self):
        return NoneSelection()

    def __repr__(self):
        return "select_all()"


class NoneSelection(Selection):
    def sub(self, key):
        return self

    def is_all_here(self):
        return False

    def is_empty(self):
        return True

    def __invert__(self):
        return AllSelection()

    def __repr__(self):
        return "select_none()"


class AddressSelection(Selection):
    """Selects the given paths and everything below them (a trie of keys)."""

    def __init__(self, trie: dict):
        self._trie = trie  # key -> AddressSelection | AllSelection

    @staticmethod
    def of(paths) -> Selection:
        trie: dict = {}
        for path in paths:
            node = trie
            for i, k in enumerate(path):
                last = i == len(path) - 1
                cur = node.get(k)
                if last:
                    node[k] = _ALL
                    break
                if cur is _ALL:
                    break
                if cur is None:
                    cur = {}
                    node[k] = cur
                node = cur
        return AddressSelection._freeze(trie) if trie else NoneSelection()

    @staticmethod
    def _freeze(trie):
        return AddressSelection(
            {k: (v if v is _ALL else AddressSelection._freeze(v)) for k, v in trie.items()}
        )

    def sub(self, key):
        return self._trie.get(key, _NONE)

    def is_all_here(self):
        return False

    def is_empty(self):
        return all(v.is_empty() for v in self._trie.values())

    def __repr__(self):
        return f"select({', '.join(repr(k) for k in self._trie)})"


class Complement(Selection):
    def __init__(self, inner: Selection):
        self.inner = inner

    def sub(self, key):
        return ~self.inner.sub(key)

    def is_all_here(self):
        return not self.inner.is_all_here()

    def __invert__(self):
        return self.inner

    def __repr__(self):
        return f"~{self.inner!r}"


class Union(Selection):
    def __init__(self, a: Selection, b: Selection):
        self.a, self.b = a, b

    def sub(self, key):
        return self.a.sub(key) | self.b.sub(key)

    def is_all_here(self):
        return self.a.is_all_here() or self.b.is_all_here()

    def is_empty(self):
        return self.a.is_empty() and self.b.is_empty()

    def __repr__(self):
        return f"({self.a!r} | {self.b!r})"


class Intersection(Selection):
    def __init__(self, a: Selection, b: Selection):
        self.a, self.b = a, b

    def sub(self, key):
        return self.a.sub(key) & self.b.sub(key)

    def is_all_here(self):
        return self.a.is_all_here() and self.b.is_all_here()

    def is_empty(self):
        return self.a.is_empty() or self.b.is_empty()

    def __repr__(self):
        return f"({self.a!r} & {self.b!r})"


_ALL = AllSelection()
_NONE = NoneSelection()


def select(*addrs: Address) -> Selection:
    """Select the given addresses (and everything below each)."""
    return AddressSelection.of([to_path(a) for a in addrs])


def select_all() -> Selection:
    return _ALL


def select_none() -> Selection:
    return _NONE
