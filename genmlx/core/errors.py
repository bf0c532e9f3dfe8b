"""Errors raised by genmlx, each naming the address, parameter or function at fault.

Errors raised deep inside a nested generative function carry an address path that
grows as the error propagates outwards (see :meth:`AddressedError.at`), so the final
message names the full address in the outermost model.
"""

from __future__ import annotations

from typing import Any


def format_address(path: tuple) -> str:
    """Render an address path the way a user writes it: ``'x'`` or ``('y', 3)``."""
    if len(path) == 1:
        return repr(path[0])
    return repr(tuple(path))


class GenMLXError(Exception):
    """Base class of genmlx's own errors."""


class AddressedError(GenMLXError, ValueError):
    """An error about the choice (or call) at an address.

    ``path`` is relative to the generative function that raised it; each enclosing
    dynamic GF prefixes the address under which it called the inner one.
    """

    def __init__(self, problem: str, path: tuple = (), gen_fn: str | None = None):
        self.problem = problem
        self.path = tuple(path)
        self.gen_fn = gen_fn
        super().__init__(problem)

    def at(self, prefix: tuple, gen_fn: str | None = None) -> "AddressedError":
        self.path = tuple(prefix) + self.path
        if gen_fn is not None:
            self.gen_fn = gen_fn
        self.args = (str(self),)
        return self

    def __str__(self) -> str:
        where = f"at address {format_address(self.path)}" if self.path else "at the root address"
        fn = f" in generative function '{self.gen_fn}'" if self.gen_fn else ""
        return f"{where}{fn}: {self.problem}"


class AddressCollisionError(AddressedError):
    """The same address (or an address and one of its prefixes) was used twice."""


class ConstraintShapeError(AddressedError):
    """A constrained value does not have the shape of the choice at its address."""


class MissingChoiceError(AddressedError, KeyError):
    """A choice required by assess (or a choice-map lookup) is absent."""

    def __str__(self) -> str:  # KeyError would quote the message
        return AddressedError.__str__(self)


class UnvisitedConstraintError(GenMLXError, ValueError):
    """Constraints were given at addresses the model never visited."""

    def __init__(self, addresses: list[tuple], gen_fn: str | None):
        self.addresses = [tuple(a) for a in addresses]
        self.gen_fn = gen_fn
        super().__init__(str(self))

    def at(self, prefix: tuple, gen_fn: str | None = None) -> "UnvisitedConstraintError":
        self.addresses = [tuple(prefix) + a for a in self.addresses]
        if gen_fn is not None:
            self.gen_fn = gen_fn
        self.args = (str(self),)
        return self

    def __str__(self) -> str:
        names = ", ".join(format_address(a) for a in self.addresses)
        fn = f"'{self.gen_fn}'" if self.gen_fn else "the generative function"
        return (
            f"{fn} never visited the constrained address(es) {names}; "
            "check the spelling and nesting of the constraint addresses"
        )


class TraceContextError(GenMLXError, RuntimeError):
    """``gm.trace`` was called outside of any generative-function execution."""


def describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"array of shape {tuple(shape)} and dtype {getattr(value, 'dtype', '?')}"
    return f"{type(value).__name__} {value!r}"
