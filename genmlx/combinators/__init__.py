"""Combinators: generative functions built from other generative functions.

One module per combinator; every combinator implements the full GFI (simulate,
generate, assess, propose, update, regenerate, project), and its batched forms
(``vsimulate``, ``vgenerate``, batched ``update``/``regenerate``/``project``) through
:mod:`genmlx.core.vectorize` (Unfold/Scan update batched traces step by step).
"""

from genmlx.combinators.custom_gradient import CustomGradientGF, CustomGradientTrace
from genmlx.combinators.map import Map, MapTrace
from genmlx.combinators.mask import Mask, MaskTrace
from genmlx.combinators.mix import Mix, MixTrace
from genmlx.combinators.recurse import Recurse
from genmlx.combinators.scan import Scan
from genmlx.combinators.switch import Switch, SwitchTrace
from genmlx.combinators.transforms import ArgRetTransform, TransformTrace, contramap, dimap, map_retval
from genmlx.combinators.unfold import Unfold
from genmlx.combinators._sequence import SequenceTrace

__all__ = [
    "Map", "Unfold", "Scan", "Switch", "Mask", "Mix", "Recurse", "contramap", "dimap",
    "map_retval", "CustomGradientGF", "SequenceTrace", "MapTrace", "SwitchTrace", "MaskTrace",
    "MixTrace", "TransformTrace", "CustomGradientTrace", "ArgRetTransform",
]
