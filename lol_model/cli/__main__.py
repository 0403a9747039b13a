"""``python -m lol_model.cli``: the ``lol`` command."""

import sys

from . import main

sys.exit(main())
