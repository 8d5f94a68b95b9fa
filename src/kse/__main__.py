"""``python -m kse``: the command-line tool (same as the ``kse`` command)."""

import sys

from .cli import main

sys.exit(main())
