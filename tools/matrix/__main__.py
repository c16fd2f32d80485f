"""``python -m tools.matrix``."""

import sys

from tools.matrix.cli import main

sys.exit(main())
