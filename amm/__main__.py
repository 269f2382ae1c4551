"""``python -m amm``: the ``amm`` command, for environments without the console script."""

import sys

from amm.cli import main

sys.exit(main())
