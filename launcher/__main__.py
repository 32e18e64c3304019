"""``python -m launcher ...`` is the ``sharded-ams`` command."""

import sys

from launcher.cli import main

sys.exit(main())
