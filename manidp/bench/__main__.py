"""``python -m manidp.bench``: the same as ``manidp-bench``."""

import sys

from .cli import main

sys.exit(main())
