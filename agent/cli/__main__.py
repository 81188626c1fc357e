"""``python -m agent.cli``: the same command as the ``metal-agent`` console script."""

import sys

from agent.cli import main

sys.exit(main())
