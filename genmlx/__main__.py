"""``python -m genmlx …`` is the ``genmlx`` command line (see :mod:`genmlx.cli`)."""

import sys

from genmlx.cli import main

sys.exit(main())
