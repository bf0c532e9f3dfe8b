"""The abstract trace: a record of one execution of a generative function."""

from __future__ import annotations

from typing import Any

from genmlx.core.address import Address
from genmlx.core.choicemap import ChoiceMap


class Trace:
    """Record of an execution of a generative function (GF).

    Attributes every trace has: ``gen_fn`` (the GF), ``args`` (a tuple), ``retval``,
    ``score`` (log p of all choices, under ``args``), ``choices`` (a ChoiceMap), and
    ``tr[addr]`` (the value of the choice at ``addr``, or the return value of the call
    made at ``addr``). ``batch_size`` is ``None`` for a single trace and ``n`` for a
    batched trace, whose score is ``[n]`` and whose choices carry a leading axis ``n``.
    Traces are immutable.
    """

    gen_fn: Any
    args: tuple
    batch_size: int | None

    @property
    def retval(self) -> Any:
        raise NotImplementedError

    @property
    def score(self):
        raise NotImplementedError

    @property
    def choices(self) -> ChoiceMap:
        raise NotImplementedError

    def get_choices(self) -> ChoiceMap:
        return self.choices

    def _canonical(self) -> "Trace":
        """The same trace in the layout every trace of its structure can take (a
        sequence trace from SMC holds its steps as columns, see
        ``genmlx.combinators._sequence.StackedSteps``); ``self`` for most traces."""
        return self

    def get_score(self):
        return self.score

    def get_retval(self):
        return self.retval

    def get_args(self) -> tuple:
        return self.args

    def get_gen_fn(self):
        return self.gen_fn

    def __getitem__(self, addr: Address) -> Any:
        return self.choices[addr]

    def __getstate__(self):
        raise TypeError("genmlx traces are not pickled; save their choices with safetensors")


class StoredTrace(Trace):
    """A trace whose return value and score are stored fields ``retval_`` and ``score_``."""

    retval_: Any
    score_: Any

    @property
    def retval(self) -> Any:
        return self.retval_

    @property
    def score(self):
        return self.score_


def same_structure(traces: list, flat) -> list:
    """``[flat(t) for t in traces]`` (``flat(t) -> (leaves, treedef)``); where the
    structures differ, again with every trace in its canonical layout
    (:meth:`Trace._canonical`): e.g. a sequence trace returned by SMC and one returned
    by an update read alike but flatten differently until then."""
    flats = [flat(t) for t in traces]
    if any(td != flats[0][1] for _, td in flats[1:]):
        canon = [t._canonical() for t in traces]
        if any(c is not t for c, t in zip(canon, traces)):
            flats = [flat(t) for t in canon]
    return flats
