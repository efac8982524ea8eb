"""``python -m edge_agent run ...`` — the same as the ``roadloop-agent`` console script."""

import sys

from edge_agent.cli import main

sys.exit(main())
