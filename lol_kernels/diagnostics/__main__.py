"""``python -m lol_kernels.diagnostics [diagnose] [flags]``: run ``lol diagnose``."""

import sys

from .cli import main

sys.exit(main())
