"""genmlx: probabilistic programming with generative functions and neural amortized
inference on MLX."""

from genmlx._blas import describe_blas, ensure_fast_blas

ensure_fast_blas()  # before mlx.core is imported anywhere below

from genmlx.core.address import Address  # noqa: E402
from genmlx.core.choicemap import ChoiceMap, choicemap  # noqa: E402
from genmlx.core.compile import compile  # noqa: E402,A004
from genmlx.core.diff import Diff, IntDiff, NoChange, UnknownChange, VectorDiff  # noqa: E402
from genmlx.core.dynamic import DynamicGF, DynamicTrace, gen  # noqa: E402
from genmlx.core.errors import (  # noqa: E402
    AddressCollisionError,
    ConstraintShapeError,
    GenMLXError,
    MissingChoiceError,
    TraceContextError,
    UnvisitedConstraintError,
)
from genmlx.core.gfi import GenerativeFunction, Invocation  # noqa: E402
from genmlx.core.handlers import trace  # noqa: E402
from genmlx.core.pytree import tree_flatten, tree_unflatten  # noqa: E402
from genmlx.core.selection import Selection, select, select_all, select_none  # noqa: E402
from genmlx.core.trace import Trace  # noqa: E402
from genmlx.core.validation import set_validation, validation, validation_enabled  # noqa: E402
from genmlx.core.vectorize import stack_traces, unbatch  # noqa: E402
from genmlx.distributions import *  # noqa: E402,F401,F403
from genmlx.distributions import Distribution, DistTrace, UnconstrainedValue, constraints  # noqa: E402
from genmlx.combinators import (  # noqa: E402
    CustomGradientGF, Map, Mask, Mix, Recurse, Scan, Switch, Unfold, contramap, dimap,
)
from genmlx import inference  # noqa: E402,F401
from genmlx import diagnostics  # noqa: E402,F401
from genmlx import nn  # noqa: E402,F401
from genmlx import amortized  # noqa: E402,F401
from genmlx import distributed  # noqa: E402,F401  (data-parallel helpers; no init at import)

__version__ = "0.1.0"
