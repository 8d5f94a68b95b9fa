"""``python -m kse.cli``: the command-line tool (same as ``kse`` and ``python -m kse``)."""

import sys

from . import main

sys.exit(main())
